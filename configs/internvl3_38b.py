"""FaceLLM-38B: InternVL3-38B (InternViT-6B + Qwen2.5-32B), the paper's LoRA recipe.

`--config=configs/internvl3_38b.py` (= `:lora`, the paper), `:full` or `:all_but_vision`;
parameters are sharded over `fsdp` (154 GB of float32 weights); set `--config.data.dir` and
`--config.model.hf_checkpoint=<local OpenGVLab/InternVL3-38B-hf directory>`.

Values: OpenGVLab/InternVL3-38B-hf config.json as convert_internvl_weights_to_hf.py builds it from
OpenGVLab/InternVL3-38B: the Qwen2.5-32B decoder (5120/27648, 64 layers, 40 heads, 8 KV heads,
rope_theta 1e6, untied head) with InternVL3's 151674-token vocabulary and max positions 32768, and
InternViT-6B-448px-V2_5 (3200/12800, 45 blocks, 25 heads, RMSNorm, QK-norm, no q/k/v bias;
OpenGVLab/InternViT-6B-448px-V1-5/config.json). 38,388,164,992 parameters. Not read here: the 38B
file itself (rms_norm_eps 1e-6 follows InternVL3's 1B/8B/78B llm_config values).
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
  # train.sh (model_name='InternVL3-38B'): --per_device_train_batch_size 2
  # --gradient_accumulation_steps 6 on one process = 12 per step, 7,303 steps (export.sh: checkpoint-7303)
  common.set_recipe(cfg, args.recipe, reference_batch=12)
  cfg.model = common.model_block(
      vision=common.INTERNVIT_6B,
      text=common.qwen_text(vocab_size=151674, hidden_size=5120, intermediate_size=27648,
                            num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                            tie_word_embeddings=False),
      image_token_id=151667)
  # The 12 rows cannot split over the 8 (v5p-16) or 16 chips of an fsdp-only mesh: tensor=2 halves
  # the row shards, so on v5p-16 (fsdp=4 x tensor=2) the batch is one micro-batch of 3 rows per
  # shard. Measured (benchmarks/README.md, compile-only): 16.7 GiB per chip of 95.7 with scanned
  # layers and remat=full, compiled in 265 s (unrolled: 325 GB of temporaries at 1 row, no fit).
  cfg.train.grad_accum = 1
  cfg.train.scan_layers = True
  cfg.train.remat = "full"
  cfg.mesh.shape.update(dict(data=1, fsdp=-1, tensor=2))
  return cfg.lock()
