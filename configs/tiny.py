"""A CPU-sized InternVL for the offline demo and the training tests, trained from scratch.

Same architecture as InternVL3 (InternViT with LayerNorm and layer scale, pixel-shuffle projector,
Qwen2 decoder), shrunk: a 2-layer ViT of width 64 on 112 px images (8x8 patches of 14 px -> 16
image tokens after the 0.5 pixel shuffle) and a 4-layer decoder of width 128. The vocabulary fits a
byte-level BPE trained locally with `facellm_jax.input.tokenizer.train_tokenizer`, whose special
tokens come first, so `<IMG_CONTEXT>` is id 5.

`--config=configs/tiny.py` trains every parameter (`:full`, the default); `:lora` or
`:all_but_vision` too. `vocab=N` sizes the vocabulary (`configs/tiny.py:lora,vocab=2048`); every key
is overridable as usual (`--config.train.num_steps=50`). Float32 compute, as CPU runs and the
exact-resume tests want.
"""

import pathlib
import sys

import ml_collections

if (_root := str(pathlib.Path(__file__).resolve().parents[1])) not in sys.path:
  sys.path.insert(0, _root)  # config files are loaded by path; this makes `configs` importable
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position

IMG_CONTEXT_ID = 5  # index of "<IMG_CONTEXT>" in facellm_jax.input.tokenizer.SPECIAL_TOKENS


def get_config(arg: str | None = None, variant: str = "full") -> ml_collections.ConfigDict:
  """`variant`: the trainable kind when `arg` names none (files built on this one set theirs)."""
  args = common.parse_arg(arg, variant=variant, vocab=1024)
  cfg = common.base_config(args.variant)
  cfg.model = common.model_block(
      vision=dict(common.INTERNVIT_300M, hidden_size=64, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, image_size=112),
      text=common.qwen_text(vocab_size=args.vocab, hidden_size=128, intermediate_size=384,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            rope_theta=10_000.0, max_position_embeddings=1024,
                            tie_word_embeddings=False),
      image_token_id=IMG_CONTEXT_ID)
  cfg.data.cutoff_len = 512
  cfg.train.num_steps = 300
  cfg.train.batch_size = 8
  cfg.train.learning_rate = 1e-3  # from scratch, not the fine-tuning 1e-5
  cfg.train.warmup_ratio = 0.05
  cfg.train.compute_dtype = "float32"
  cfg.checkpoint.every_steps = 100
  cfg.checkpoint.keep = 2
  cfg.tokenizer.path = ""  # the demo trains one and sets this
  return cfg.lock()
