"""The offline demo's model and recipe: `configs/tiny.py`, tuned to read synthetic faces in minutes.

`facellm-demo` trains this from scratch on 2 CPU cores and must reach 80% on a held-out
FaceXBench-style benchmark (chance 25%). What differs from tiny.py, and why (measured with
`facellm-demo`; numbers in facellm_jax/demo.py's report):
- downsample_ratio 0.125: the pixel shuffle folds the whole 8x8 ViT grid into ONE image token
  (4096 features -> the projector). With 16 tokens the decoder must first learn where on the
  face to look before any answer improves, and a from-scratch run of this size sits at chance
  for thousands of steps; one token makes the projector the place that learns what the face
  shows, as a linear probe would.
- cutoff_len 128: an MCQ prompt is about 100 tokens; longer QA answers are cut (their first
  sentences carry the labels).

`--config=configs/demo.py` takes tiny.py's arguments (`:lora`, `vocab=N`).
"""

import pathlib
import sys

import ml_collections

if (_root := str(pathlib.Path(__file__).resolve().parents[1])) not in sys.path:
  sys.path.insert(0, _root)  # config files are loaded by path; this makes `configs` importable
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  cfg = tiny.get_config(arg).unlock()
  cfg.model.downsample_ratio = 0.125
  cfg.data.cutoff_len = 128
  cfg.train.num_steps = 1500
  cfg.train.batch_size = 32
  cfg.train.learning_rate = 1e-3
  cfg.checkpoint.every_steps = 500
  cfg.train.log_every = 25
  return cfg.lock()
