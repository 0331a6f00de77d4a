"""The offline demo's first stage: pretrain `configs/demo.py`'s model on attribute cards.

A card (`data_gen/cards.py`) names every benchmark factor of one face in about 60 tokens, so each
row supervises them all; this stage stands in for the pretraining an InternVL checkpoint already
has, and `configs/demo.py` (the FaceLLM stage) starts from its export. What differs from demo.py:
- cutoff_len 64 and batch 64: a card fits in 64 tokens, so a step costs what a demo.py step does
  (64 x 64 = 32 x 128 tokens) and sees twice the faces;
- 1,600 steps: age, gender, race and eyewear are read within ~400 steps, expression and head pose
  need several hundred more (1,200 steps of 32 then 1,000 of 16 fine-tuning left them at 60% and
  40%; benchmarks/README.md).

`--config=configs/demo_pretrain.py` takes tiny.py's arguments (`:lora`, `vocab=N`).
"""

import pathlib
import sys

import ml_collections

if (_root := str(pathlib.Path(__file__).resolve().parents[1])) not in sys.path:
  sys.path.insert(0, _root)  # config files are loaded by path; this makes `configs` importable
from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  cfg = demo.get_config(arg).unlock()
  cfg.data.cutoff_len = 64
  cfg.train.num_steps = 1600
  cfg.train.batch_size = 64
  return cfg.lock()
