"""FaceLLM-1B: InternVL3-1B (InternViT-300M + Qwen2.5-0.5B), the paper's LoRA recipe.

`--config=configs/internvl3_1b.py` (= `:lora`, the paper), `:full` (every parameter) or
`:all_but_vision` (projector + language model), then `--config.data.dir=...` and
`--config.model.hf_checkpoint=<local OpenGVLab/InternVL3-1B-hf directory>`.

Values: OpenGVLab/InternVL3-1B-hf config.json, which transformers' convert_internvl_weights_to_hf.py
builds from OpenGVLab/InternVL3-1B's llm_config/vision_config (its printed config: Qwen2 896/4864,
24 layers, 14 heads, 2 KV heads, vocab 151674, rope_theta 1e6, rms_norm_eps 1e-6, max positions
32768, top-level tie_word_embeddings false; InternViT-300M-448px, select_layer -1, ratio 0.5), the
same text_config as hf-internal-testing/tiny-processor-internvl's config.json (the -hf layout, with
image_token_id 151667, image_seq_length 256, downsample_ratio 0.5). The embeddings are NOT tied:
untied, the parameter count is 938,193,024 = 1.876 GB in bf16, the size of the released
model.safetensors (1.88 GB); tied it would be 1.60 GB. rope_scaling {dynamic, factor 2} in the
release only acts past 32768 positions and is not modelled.
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
      text=common.qwen_text(vocab_size=151674, hidden_size=896, intermediate_size=4864,
                            num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                            tie_word_embeddings=False),
      image_token_id=151667)
  # Measured (benchmarks/README.md, compile-only): the reference batch in one micro-batch (80 rows
  # divide over 1, 2, 4, 8 and 16 devices): 20 rows per chip on v5p-8 take 30.3 GiB of its 95.7
  # with scanned layers and remat=dots (compiled in 245 s; unrolled, ~1170 s). 8 GPUs or v6e-8 get
  # 10 rows per device (the reference's own micro-batch); on v5litepod-8's 16 GB chips add
  # --config.train.remat=full (its 10 rows per chip take 5.0 GiB).
  cfg.train.grad_accum = 1
  cfg.train.scan_layers = True
  cfg.train.remat = "dots"
  return cfg.lock()
