"""The offline demo's card stage: train `configs/demo.py`'s model on attribute cards.

A card (`data_gen/cards.py`) names every benchmark factor of one face in about 36 tokens, so each
row supervises them all; this stage and the vision stage before it (`facellm_jax/demo_vision.py`,
which trains the tower on the labels and writes the checkpoint this stage starts from) stand in
for the pretraining an InternVL checkpoint already has; `configs/demo.py` (the FaceLLM stage)
starts from this stage's export. What differs from demo.py:
- cutoff_len 40 and batch 64, not packed: a card row is at most 37 tokens (35.7 on average, so
  packing would gain nothing), and rows are padded to the cutoff, so the cutoff is what a step
  costs (40 took 0.59 s a step where 56 took 0.77);
- the tower frozen (`all_but_vision`, demo.py's default too): it already reads the faces, and
  trained here at this stage's start, under a random decoder, it unlearned expression and head
  pose (held-out 32% and 36% after 300 steps, against 24% / 74% frozen);
- learning rate 2e-3: from the vision checkpoint, 150 steps reached a loss of 0.94 at 5e-4, 0.37
  at 2e-3 and 0.46 at 5e-3;
- 600 steps of 64: the decoder learns to read the image token slot by slot, the slots nearest
  the image first; after 150 steps it read age and gender, after 600 every slot but JPEG quality
  (benchmarks/README.md, demo section, fourth round);
- with `facellm-demo --mcq-answer text_letter` the stage's data also holds one letter lookup per
  face (`data_gen/mcq.py`'s `pointer`, at most 40 tokens too): in the same 600 steps, half of the
  rows, the decoder learns to find an option's text in the list and copy its letter (seventh round).

`--config=configs/demo_pretrain.py` takes tiny.py's arguments (`:full`, `:lora`, `vocab=N`).
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
  cfg.train.num_steps = 600
  cfg.train.batch_size = 64
  cfg.train.learning_rate = 2e-3
  return cfg.lock()
