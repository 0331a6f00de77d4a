"""FaceLLM-8B: InternVL3-8B (InternViT-300M + Qwen2.5-7B), the paper's LoRA recipe.

`--config=configs/internvl3_8b.py` (= `:lora`, the paper), `:full` or `:all_but_vision`; every
variant shards parameters and optimizer state over `fsdp` (~128 GB in float32 with Adam for the
two non-LoRA ones); set
`--config.data.dir` and `--config.model.hf_checkpoint=<local OpenGVLab/InternVL3-8B-hf directory>`.

Values: OpenGVLab/InternVL3-8B-hf config.json as convert_internvl_weights_to_hf.py builds it from
OpenGVLab/InternVL3-8B (also mirrored in Ascend/MindSpeed-MM examples/internvl3/model_8B.json):
Qwen2 3584/18944, 28 layers, 28 heads, 4 KV heads, vocab 151674, rope_theta 1e6, rms_norm_eps 1e-6,
max positions 32768, untied head; InternViT-300M-448px-V2_5, select_layer -1, ratio 0.5.
7,944,373,760 parameters = 15.89 GB in bf16, the size of InternVL3-8B-hf (15.9 GB).
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
  # train.sh's note for InternVL3-1B/8B: --per_device_train_batch_size 10
  # --gradient_accumulation_steps 8 on one GPU = 80 per step, 1,096 steps
  common.set_recipe(cfg, args.recipe, reference_batch=80)
  cfg.model = common.model_block(
      vision=common.INTERNVIT_300M,
      text=common.qwen_text(vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            tie_word_embeddings=False),
      image_token_id=151667)
  # Measured (benchmarks/README.md, compile-only) on v5p-8: the reference batch in one micro-batch,
  # 20 rows per chip, takes 28.8 GiB with scanned layers and remat=full (compiled in 260 s);
  # remat=dots would need 119 GB of temporaries.
  cfg.train.grad_accum = 1
  cfg.train.scan_layers = True
  cfg.train.remat = "full"
  # LoRA too: replicated, the 15.9 GB bf16 base would sit on every chip (4 GB per chip with fsdp=4).
  cfg.mesh.shape.update(dict(data=1, fsdp=-1))
  return cfg.lock()
