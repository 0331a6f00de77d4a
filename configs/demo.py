"""The offline demo's model, and its fine-tuning stage: `configs/tiny.py` tuned to read synthetic faces.

`facellm-demo` first pretrains this model's vision tower on the faces' labels
(`facellm_jax/demo_vision.py`), then the model on attribute cards (`configs/demo_pretrain.py`),
exports it as an HF checkpoint, then fine-tunes that checkpoint with
this config on MCQ items, offline QA and cards, on 2 CPU cores, and must reach 80% on a held-out
FaceXBench-style benchmark (chance 25%). What differs from tiny.py, and why (measured on the demo
benchmark; see facellm_jax/demo.py):
- downsample_ratio 0.125: the pixel shuffle folds the whole 8x8 ViT grid into ONE image token
  (4096 features -> the projector). With 16 tokens the decoder must first learn where on the
  face to look before any answer improves; one token makes the projector the place that learns
  what the face shows, as a linear probe would.
- packing, rows of 208 tokens, 16 rows, 500 steps: the items are 36-96 tokens (about 65 on
  average with the demo's tokenizer, facellm_jax/demo.py), so padded one per row to the longest
  a step spent a third of its tokens on padding (a step costs its tokens: 128 took 1.6x the time
  of 88). Packed, a step of 16 x 208 tokens holds about 48 examples, where 32 x 104 held 32: 340
  packed steps saw what 500 unpacked did (500 since 340 fell to 87.7% on another CPU;
  demo.Settings). `max_images_per_row` 4: the vision tower runs on every slot, filled or not, and
  only 5 of the shortest items (cards, 36 tokens; a tenth of the mix) would fit.
- the tower frozen (`all_but_vision`; `:full` or `:lora` as arguments): the vision stage
  (facellm_jax/demo_vision.py) taught it to see, and its backward pass is a quarter to a third of
  a step's time.
- learning rate 1e-3: from the card stage's export (seed 0), 340 steps at 2e-4 / 5e-4 / 1e-3 gave
  80.9% / 87.1% / 88.9% held-out, expression 20 / 50 / 80%: the pretrained model reads expression
  on 91% of new faces, and the fine-tuning must learn to answer it from the end of a long prompt.
- checkpoint only at the end of the stage (and on SIGTERM/Ctrl-C, which the loop always saves
  on): a save pauses a 2-core run for seconds (benchmarks/README.md, demo profile), and a stage
  lasts minutes.

`--config=configs/demo.py` takes tiny.py's arguments (`:full`, `:lora`, `vocab=N`).
"""

import pathlib
import sys

import ml_collections

if (_root := str(pathlib.Path(__file__).resolve().parents[1])) not in sys.path:
  sys.path.insert(0, _root)  # config files are loaded by path; this makes `configs` importable
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  cfg = tiny.get_config(arg, variant="all_but_vision").unlock()
  cfg.model.downsample_ratio = 0.125
  cfg.data.cutoff_len = 208
  cfg.data.packing = True
  cfg.data.max_images_per_row = 4
  cfg.train.num_steps = 500
  cfg.train.batch_size = 16
  cfg.train.learning_rate = 1e-3
  cfg.checkpoint.every_steps = 1_000_000  # the demo caps it at the stage's steps
  cfg.train.log_every = 25
  return cfg.lock()
