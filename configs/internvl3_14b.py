"""InternVL3-14B (InternViT-300M + Qwen2.5-14B) with the paper's LoRA recipe.

`--config=configs/internvl3_14b.py` (= `:lora`), `:full` or `:all_but_vision`; parameters are
sharded over `fsdp` (60 GB of float32 weights); set `--config.data.dir` and
`--config.model.hf_checkpoint=<local OpenGVLab/InternVL3-14B-hf directory>`.

Values: OpenGVLab/InternVL3-14B-hf config.json as convert_internvl_weights_to_hf.py builds it from
OpenGVLab/InternVL3-14B: the Qwen2.5-14B decoder (5120/13824, 48 layers, 40 heads, 8 KV heads,
rope_theta 1e6, untied head) with InternVL3's 151674-token vocabulary and max positions 32768;
InternViT-300M-448px-V2_5. 15,117,256,704 parameters = 30.23 GB in bf16 (OpenGVLab/InternVL3-14B:
30.2 GB). rms_norm_eps 1e-6 is InternVL3's llm_config value for 1B/8B/78B; the 14B file itself
could not be read here (Qwen2.5-14B base uses 1e-5, -Instruct 1e-6).
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
      text=common.qwen_text(vocab_size=151674, hidden_size=5120, intermediate_size=13824,
                            num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                            tie_word_embeddings=False),
      image_token_id=151667)
  cfg.train.grad_accum = 8  # 12 rows per micro-batch
  cfg.mesh.shape.update(dict(data=1, fsdp=-1))
  return cfg.lock()
