"""InternVL3-2B (InternViT-300M + Qwen2.5-1.5B) with the paper's LoRA recipe.

`--config=configs/internvl3_2b.py` (= `:lora`), `:full` or `:all_but_vision`; set
`--config.data.dir` and `--config.model.hf_checkpoint=<local OpenGVLab/InternVL3-2B-hf directory>`.

Values: OpenGVLab/InternVL3-2B-hf config.json as convert_internvl_weights_to_hf.py builds it from
OpenGVLab/InternVL3-2B: the Qwen2.5-1.5B decoder (1536/8960, 28 layers, 12 heads, 2 KV heads,
rope_theta 1e6, rms_norm_eps 1e-6) with InternVL3's 151674-token vocabulary, max positions 32768
(InternVL3's llm_config template), InternViT-300M-448px-V2_5. The embeddings are NOT tied (unlike
Qwen2.5-1.5B): untied, 2,088,957,440 parameters = 4.178 GB in bf16, the released model.safetensors
(4.18 GB); tied would be 3.71 GB.
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
      text=common.qwen_text(vocab_size=151674, hidden_size=1536, intermediate_size=8960,
                            num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                            tie_word_embeddings=False),
      image_token_id=151667)
  cfg.train.grad_accum = 4  # 24 rows per micro-batch: 3 per device on 8 GPUs
  return cfg.lock()
