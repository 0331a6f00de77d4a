"""The offline demo's first stage: pretrain `configs/demo.py`'s model on attribute cards.

A card (`data_gen/cards.py`) names every benchmark factor of one face in about 36 tokens, so each
row supervises them all; this stage stands in for the pretraining an InternVL checkpoint already
has, and `configs/demo.py` (the FaceLLM stage) starts from its export. What differs from demo.py:
- cutoff_len 40 and batch 64, not packed: a card row is at most 37 tokens (35.7 on average, so
  packing would gain nothing), and rows are padded to the cutoff, so the cutoff is what a step
  costs (40 took 0.59 s a step where 56 took 0.77);
- 1,200 steps of 64 (76,800 cards): the faces seen, not the steps, decide expression and head
  pose. After 400 steps both are at chance on the cards while age and eyewear are read; after
  1,600 every factor but image quality is (then 500 fine-tuning steps: 86.3% held-out); 1,200
  gives 84.0% (expression 78, head pose 88) in 3.5 min less (benchmarks/README.md, demo section).

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
  cfg.data.cutoff_len = 40
  cfg.data.packing = False  # demo.py packs; two cards never fit in 40 tokens
  cfg.data.max_images_per_row = 0
  cfg.train.num_steps = 1200
  cfg.train.batch_size = 64
  return cfg.lock()
