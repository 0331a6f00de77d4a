"""What every config shares: the training recipe, the vision towers, and the `:arg` parser.

The recipe is FaceLLM's (Shahreza & Marcel 2025, arXiv:2507.10300, trained with LLaMA-Factory):
LoRA r=16, alpha=32 on every linear layer of the language model, learning rate 1e-5, cosine
schedule, one epoch, bf16, cutoff length 2048, effective batch ~96. The paper does not state a
warmup, weight decay or clipping; those are LLaMA-Factory's example/HF Trainer defaults (warmup
ratio 0.1, no weight decay, max grad norm 1.0).

Size files keep only what differs: the `model` block (exact values of the official `-hf`
`config.json`) and how a step is split into micro-batches and over the mesh.
"""

from __future__ import annotations

from typing import Any

import ml_collections

TRAINABLE = ("lora", "full", "all_but_vision")

# FairFaceGPT: 10,954 FairFace images x 8 attributes = 87,632 question/answer pairs; one epoch at
# the paper's effective batch of 96 is ceil(87,632 / 96) = 913 optimizer steps.
FAIRFACEGPT_EXAMPLES = 87_632
PAPER_BATCH = 96
PAPER_EPOCH_STEPS = -(-FAIRFACEGPT_EXAMPLES // PAPER_BATCH)

# InternViT-300M-448px-V2_5 (InternVL3-1B..14B, InternVL3.5-1B..8B): LayerNorm, q/k/v bias,
# no QK-norm. Values of OpenGVLab/InternViT-300M-448px(-V2_5)/config.json as the -hf conversion
# maps them (qkv_bias -> attention_bias, qk_normalization -> use_qk_norm).
INTERNVIT_300M = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=448,
    patch_size=14,
    num_channels=3,
    attention_bias=True,
    use_qk_norm=False,
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    layer_scale_init_value=0.1,
    hidden_act="gelu",
)

# InternViT-6B-448px-V2_5 (InternVL3-38B/78B): the 48-block ViT cut to 45 blocks, RMSNorm
# (InternVisionConfig's default norm_type), QK-norm, no q/k/v bias. Values of
# OpenGVLab/InternViT-6B-448px-V1-5 and -V1-2/config.json (V2_5 continues V1-5's architecture).
INTERNVIT_6B = dict(
    INTERNVIT_300M,
    hidden_size=3200,
    intermediate_size=12800,
    num_hidden_layers=45,
    num_attention_heads=25,
    attention_bias=False,
    use_qk_norm=True,
    norm_type="rms_norm",
)


def parse_arg(arg: str | None, *, variant: str, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `--config=FILE:ARG`: comma-separated words, each a trainable kind or `key=value`.

  `variant` is the trainable kind when ARG names none; `defaults` are the keys a file accepts,
  each value cast to its default's type (`configs/tiny.py:lora,vocab=2048`).
  """
  out = dict(defaults, variant=variant)
  keys = ", ".join(sorted(defaults))
  for word in filter(None, (w.strip() for w in (arg or "").split(","))):
    key, sep, value = word.partition("=")
    if not sep:
      if word not in TRAINABLE:
        raise ValueError(f"config argument {word!r}: expected a trainable kind ({', '.join(TRAINABLE)})"
                         + (f" or key=value with key in {keys}" if keys else ""))
      out["variant"] = word
    elif key in defaults:
      try:
        out[key] = type(defaults[key])(value)
      except ValueError:
        raise ValueError(f"config argument {word!r}: {key} must be of type "
                         f"{type(defaults[key]).__name__}, got {value!r}") from None
    else:
      raise ValueError(f"config argument {word!r}: unknown key {key!r}; "
                       + (f"this config takes {keys}" if keys else "this config takes no key=value"))
  return ml_collections.ConfigDict(out)


def model_block(*, vision: dict[str, Any], text: dict[str, Any], image_token_id: int,
                downsample_ratio: float = 0.5, vision_feature_layer: int = -1,
                hf_checkpoint: str = "") -> ml_collections.ConfigDict:
  """The `model` block: `facellm_jax.models.config` field for field, plus `hf_checkpoint`.

  `hf_checkpoint` is a local `InternVL*-hf` directory to start from ('' = random init).
  """
  return ml_collections.ConfigDict(dict(
      vision=dict(vision),
      text=dict(text),
      image_token_id=image_token_id,
      downsample_ratio=downsample_ratio,
      projector_hidden_act="gelu",
      vision_feature_layer=vision_feature_layer,
      vision_feature_select_strategy="default",
      hf_checkpoint=hf_checkpoint,
  ))


def qwen_text(*, model_type: str = "qwen2", vocab_size: int, hidden_size: int, intermediate_size: int,
              num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
              tie_word_embeddings: bool, rope_theta: float = 1_000_000.0, rms_norm_eps: float = 1e-6,
              max_position_embeddings: int = 32768, head_dim: int | None = None) -> dict[str, Any]:
  """A `TextConfig` dict; `head_dim` defaults to hidden/heads as in Qwen2 configs."""
  return dict(
      model_type=model_type,
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      intermediate_size=intermediate_size,
      num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads,
      num_key_value_heads=num_key_value_heads,
      head_dim=head_dim or hidden_size // num_attention_heads,
      rope_theta=rope_theta,
      rms_norm_eps=rms_norm_eps,
      max_position_embeddings=max_position_embeddings,
      tie_word_embeddings=tie_word_embeddings,
      hidden_act="silu",
  )


def base_config(trainable: str) -> ml_collections.ConfigDict:
  """Every non-model key, at the paper's recipe; `model` is left for the size file to add."""
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
  cfg = ml_collections.ConfigDict()

  cfg.data = ml_collections.ConfigDict()
  cfg.data.dir = ""  # TFDS ArrayRecord dataset directory (python -m data_gen generate --out); required.
  cfg.data.split = "train"
  cfg.data.cutoff_len = 2048  # tokens per row, as the paper's LLaMA-Factory cutoff_len
  cfg.data.packing = False  # LLaMA-Factory's default for SFT

  cfg.train = ml_collections.ConfigDict()
  cfg.train.num_steps = PAPER_EPOCH_STEPS  # one epoch of FairFaceGPT at batch 96
  cfg.train.batch_size = PAPER_BATCH  # global examples per optimizer step
  cfg.train.grad_accum = 1  # micro-batches per step; batch_size / grad_accum rows each
  cfg.train.learning_rate = 1e-5
  cfg.train.warmup_ratio = 0.1
  cfg.train.schedule = "cosine"
  cfg.train.weight_decay = 0.0
  cfg.train.max_grad_norm = 1.0
  cfg.train.trainable = trainable
  cfg.train.compute_dtype = "bfloat16"  # parameters and optimizer state stay float32
  # The frozen base weights of a LoRA run: auto = bfloat16 on accelerators (as the paper's bf16
  # run), float32 on CPU; adapters and optimizer state are float32 whatever this says.
  cfg.train.base_dtype = "auto"
  cfg.train.attention = "auto"  # auto (splash on TPU, cudnn on GPU, xla on CPU) | xla | cudnn | splash
  # Tokens per device of each LM-head + cross-entropy block: 1024 x 151674 float32 logits = 0.58 GiB
  # (InternVL3's vocabulary); 0 = whole rows at once ([rows, 2048, vocab] float32).
  cfg.train.loss_chunk = 1024
  cfg.train.seed = 0
  cfg.train.log_every = 10

  cfg.lora = ml_collections.ConfigDict()
  cfg.lora.rank = 16
  cfg.lora.alpha = 32.0
  cfg.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  cfg.lora.modules = ("language",)

  cfg.checkpoint = ml_collections.ConfigDict()
  cfg.checkpoint.every_steps = 200
  cfg.checkpoint.keep = 3

  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = the rest

  cfg.tokenizer = ml_collections.ConfigDict()
  cfg.tokenizer.path = ""  # '' = the tokenizer files in model.hf_checkpoint
  return cfg
