"""InternVL3.5-1B (InternViT-300M + Qwen3-0.6B) with the paper's LoRA recipe.

`--config=configs/internvl3_5_1b.py` (= `:lora`), `:full` or `:all_but_vision`; set
`--config.data.dir` and `--config.model.hf_checkpoint=<local OpenGVLab/InternVL3_5-1B-HF directory>`.

Values: OpenGVLab/InternVL3_5-1B config.json llm_config (Qwen3 1024/3072, 28 layers, 16 heads,
8 KV heads, head_dim 128, vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6, max positions 40960)
and InternViT-300M-448px-V2_5. The head is NOT tied (unlike Qwen3-0.6B): untied, 1,060,897,792
parameters = 2.122 GB in bf16, the released model.safetensors (2.12 GB); tied would be 1.81 GB.
image_token_id 151671 is <IMG_CONTEXT> after Qwen3's added tokens (<think> 151667, </think> 151668,
<img> 151669, </img> 151670), as in InternVLForConditionalGeneration configs built on Qwen3-0.6B;
the official -HF config.json itself could not be read here.
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
      text=common.qwen_text(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                            intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                            tie_word_embeddings=False),
      image_token_id=151671)
  cfg.train.grad_accum = 4  # 24 rows per micro-batch: 3 per device on 8 GPUs
  return cfg.lock()
