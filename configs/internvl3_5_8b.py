"""InternVL3.5-8B (InternViT-300M + Qwen3-8B) with the paper's LoRA recipe.

`--config=configs/internvl3_5_8b.py` (= `:lora`), `:full` or `:all_but_vision` (these two shard
over `fsdp`); set `--config.data.dir` and
`--config.model.hf_checkpoint=<local OpenGVLab/InternVL3_5-8B-HF directory>`.

Values: OpenGVLab/InternVL3_5-8B config.json llm_config (Qwen3 4096/12288, 36 layers, 32 heads,
8 KV heads, head_dim 128, vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6, max positions 40960,
untied head as Qwen3-8B) and InternViT-300M-448px-V2_5. 8,528,318,464 parameters = 17.06 GB in
bf16, the size of OpenGVLab/InternVL3_5-8B (17.1 GB). image_token_id 151671: see internvl3_5_1b.py.
"""

import pathlib
import sys

import ml_collections

if (_root := str(pathlib.Path(__file__).resolve().parents[1])) not in sys.path:
  sys.path.insert(0, _root)  # config files are loaded by path; this makes `configs` importable
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, variant="lora", recipe="reference")
  cfg = common.base_config(args.variant)
  # No reference run of this size: train.sh's single-GPU setting for the 1B/8B, 10 x 8 = 80 per step
  common.set_recipe(cfg, args.recipe, reference_batch=80)
  cfg.model = common.model_block(
      vision=common.INTERNVIT_300M,
      text=common.qwen_text(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                            intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                            tie_word_embeddings=False),
      image_token_id=151671)
  cfg.train.grad_accum = 8  # 12 rows per micro-batch
  if args.variant != "lora":
    cfg.mesh.shape.update(dict(data=1, fsdp=-1))
  return cfg.lock()
