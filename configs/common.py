"""What every config shares: the training recipe, the vision towers, and the `:arg` parser.

The recipe is the reference run of FaceLLM (Shahreza & Marcel 2025, arXiv:2507.10300), as the
public repository idiap/facellm runs it with LLaMA-Factory (`train.sh`, `export.sh`); each value
below names its source. `train.sh` flags: `--finetuning_type lora --lora_rank 16 --lora_alpha 32
--lora_dropout 0 --lora_target all --learning_rate 1e-05 --lr_scheduler_type cosine --warmup_steps 0
--max_grad_norm 1.0 --optim adamw_torch --bf16 True --cutoff_len 2048 --packing False
--num_train_epochs 1.0 --max_samples 100000 --template intern_vl`; the batch is per size (`set_recipe`).
Not in train.sh, so LLaMA-Factory's / the HF Trainer's defaults: weight decay 0.0, AdamW betas
(0.9, 0.999), eps 1e-8; one 448 px tile per training image (`crop_to_patches` is False by default in
LLaMA-Factory's model_args.py, and its InternVL plugin tiles only when it is set).

Size files keep only what differs: the `model` block (exact values of the official `-hf`
`config.json`), the reference batch (`set_recipe`), and how a step is split into micro-batches
and over the mesh. `recipe=ours` in the config argument (`--config=configs/internvl3_1b.py:recipe=ours`)
restores this project's earlier recipe: batch 96 (913 steps), warmup ratio 0.1, no system message.
"""

from __future__ import annotations

from typing import Any

import ml_collections

TRAINABLE = ("lora", "full", "all_but_vision")
RECIPES = ("reference", "ours")

# FairFaceGPT: 10,954 FairFace validation images x 8 attributes = 87,632 question/answer pairs, all
# read by the reference (train.sh `--max_samples 100000` caps nothing).
FAIRFACEGPT_EXAMPLES = 87_632

# LLaMA-Factory src/llamafactory/data/template.py, template "intern_vl": `default_system`, which
# its `_encode` puts before every example that has no system turn of its own (FairFaceGPT has none).
INTERN_VL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                    "多模态大语言模型。")

# `recipe=ours`: the values this project trained with before it followed the reference run
# (issue 14): one batch of 96 for every size, warmup over 10% of the steps, no system message.
OURS = dict(batch_size=96, warmup_ratio=0.1, system_prompt="")


def epoch_steps(batch_size: Any) -> Any:
  """Optimizer steps of one FairFaceGPT epoch, ceil(87,632 / batch), as the HF Trainer counts them.

  The Trainer makes ceil(ceil(N / per_device) / grad_accum) updates per epoch, the last one partial:
  1B/8B 10 x 8 -> ceil(8,764 / 8) = 1,096; 38B 2 x 6 -> ceil(43,816 / 6) = 7,303 (`checkpoint-7303` in
  export.sh). ceil(N / batch) is the same count here; our last batch is full (topped up from the
  next epoch's order) where the Trainer's has 32 (80) or 8 (12) examples.
  Given an `ml_collections.FieldReference`, returns one that follows it.
  """
  return -((-FAIRFACEGPT_EXAMPLES) // batch_size)


def set_recipe(cfg: ml_collections.ConfigDict, recipe: str, *, reference_batch: int) -> None:
  """Sets the keys in which the reference run and `recipe=ours` differ.

  `reference_batch`: examples per optimizer step of the reference run of this size
  (per_device_train_batch_size x gradient_accumulation_steps on one process). `train.num_steps`
  follows `train.batch_size` (one epoch) unless it is overridden itself.
  """
  if recipe not in RECIPES:
    raise ValueError(f"config argument recipe={recipe!r}: expected one of {', '.join(RECIPES)}")
  if recipe == "reference":
    cfg.train.batch_size = reference_batch
    cfg.train.warmup_ratio = 0.0  # train.sh: --warmup_steps 0
    cfg.data.system_prompt = INTERN_VL_SYSTEM  # train.sh: --template intern_vl
  else:
    cfg.train.batch_size = OURS["batch_size"]
    cfg.train.warmup_ratio = OURS["warmup_ratio"]
    cfg.data.system_prompt = OURS["system_prompt"]
  cfg.train.num_steps = epoch_steps(cfg.train.get_ref("batch_size"))


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
  """Every non-model key; `model`, and the batch / steps / system message (`set_recipe`), are left
  for the size file (tiny configs set their own)."""
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
  cfg = ml_collections.ConfigDict()

  cfg.data = ml_collections.ConfigDict()
  cfg.data.dir = ""  # TFDS ArrayRecord dataset directory (python -m data_gen generate --out); required.
  cfg.data.split = "train"
  cfg.data.cutoff_len = 2048  # tokens per row: train.sh --cutoff_len 2048
  cfg.data.packing = False  # train.sh --packing False
  # Image slots per row when packing (the vision tower runs on every slot, filled or not);
  # 0 = as many as the shortest examples could need, so only tokens limit the packing.
  cfg.data.max_images_per_row = 0
  cfg.data.system_prompt = ""  # system message of every training example; '' = none

  cfg.train = ml_collections.ConfigDict()
  cfg.train.num_steps = epoch_steps(OURS["batch_size"])  # train.sh --num_train_epochs 1.0 (set_recipe)
  cfg.train.batch_size = OURS["batch_size"]  # global examples per optimizer step (set_recipe)
  cfg.train.grad_accum = 1  # micro-batches per step; batch_size / grad_accum rows each
  cfg.train.learning_rate = 1e-5  # train.sh --learning_rate 1e-05
  cfg.train.warmup_ratio = 0.0  # train.sh --warmup_steps 0
  cfg.train.schedule = "cosine"  # train.sh --lr_scheduler_type cosine
  cfg.train.weight_decay = 0.0  # not in train.sh: the HF Trainer's default
  cfg.train.max_grad_norm = 1.0  # train.sh --max_grad_norm 1.0
  cfg.train.trainable = trainable
  cfg.train.compute_dtype = "bfloat16"  # train.sh --bf16 True; parameters and optimizer state stay float32
  # The frozen base weights of a LoRA run: auto = bfloat16 on accelerators (as the paper's bf16
  # run), float32 on CPU; adapters and optimizer state are float32 whatever this says.
  cfg.train.base_dtype = "auto"
  cfg.train.attention = "auto"  # auto (splash on TPU, cudnn on GPU, xla on CPU) | xla | cudnn | splash
  # Tokens per device of each LM-head + cross-entropy block: 1024 x 151674 float32 logits = 0.58 GiB
  # (InternVL3's vocabulary); 0 = whole rows at once ([rows, 2048, vocab] float32).
  cfg.train.loss_chunk = 1024
  # Activations kept for the backward (models/stack.py): none | full (block inputs only) | dots (also
  # the projections' matmul outputs); the size configs set their measured choice.
  cfg.train.remat = "none"
  # Both towers' layers as one scanned block (models/stack.py): one compiled layer instead of L.
  # Checkpoints keep this layout; inference and export convert back to the unrolled one.
  cfg.train.scan_layers = False
  cfg.train.seed = 0
  cfg.train.log_every = 10

  cfg.lora = ml_collections.ConfigDict()
  cfg.lora.rank = 16  # train.sh --lora_rank 16
  cfg.lora.alpha = 32.0  # train.sh --lora_alpha 32
  # train.sh --lora_dropout 0: no dropout, which is all our LoRA does. --lora_target all: LLaMA-Factory's
  # find_all_linear_modules + patch_target_modules take every Linear but lm_head, the vision tower and
  # the projector (freeze_vision_tower / freeze_multi_modal_projector default True): these seven.
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
