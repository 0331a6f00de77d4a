"""Model configs: frozen dataclasses that mirror HF `InternVLConfig` field for field.

The HF `config.json` is the source of truth for a checkpoint, so `from_hf_dict`/`to_hf_dict`
round-trip it; `configs/*.py` hold the official values as `ml_collections` for training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_VISION_NORMS = ("layer_norm", "rms_norm")
_TEXT_MODELS = ("qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """InternViT (`InternVLVisionConfig`)."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 448
  patch_size: int = 14
  num_channels: int = 3
  attention_bias: bool = True
  use_qk_norm: bool = False
  norm_type: str = "layer_norm"
  layer_norm_eps: float = 1e-6
  layer_scale_init_value: float = 0.1
  hidden_act: str = "gelu"

  def __post_init__(self):
    if self.norm_type not in _VISION_NORMS:
      raise ValueError(f"vision norm_type must be one of {_VISION_NORMS}, got {self.norm_type!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError("vision hidden_size must be divisible by num_attention_heads")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Qwen2 (InternVL3) or Qwen3 (InternVL3.5) decoder."""

  model_type: str = "qwen2"
  vocab_size: int = 151674
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_hidden_layers: int = 24
  num_attention_heads: int = 14
  num_key_value_heads: int = 2
  head_dim: int = 64
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"

  def __post_init__(self):
    if self.model_type not in _TEXT_MODELS:
      raise ValueError(f"text model_type must be one of {_TEXT_MODELS}, got {self.model_type!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

  @property
  def qkv_bias(self) -> bool:
    return self.model_type == "qwen2"

  @property
  def qk_norm(self) -> bool:
    return self.model_type == "qwen3"


@dataclasses.dataclass(frozen=True)
class FaceLLMConfig:
  """InternVL: vision tower + pixel-shuffle MLP projector + language model."""

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  image_token_id: int = 151667
  downsample_ratio: float = 0.5
  projector_hidden_act: str = "gelu"
  vision_feature_layer: int = -1
  vision_feature_select_strategy: str = "default"

  def __post_init__(self):
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"unknown vision_feature_select_strategy {self.vision_feature_select_strategy!r}")
    grid = self.vision.image_size // self.vision.patch_size
    if (grid * self.downsample_ratio) % 1:
      raise ValueError(f"patch grid {grid} is not divisible by 1/downsample_ratio")

  @property
  def image_seq_length(self) -> int:
    """Placeholder tokens per image (256 for 448 px, patch 14, ratio 0.5)."""
    grid = self.vision.image_size // self.vision.patch_size
    return int(grid * self.downsample_ratio) ** 2

  def replace(self, **kw: Any) -> FaceLLMConfig:
    return dataclasses.replace(self, **kw)


def _scalar(x: Any) -> int:
  return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def from_hf_dict(d: dict[str, Any]) -> FaceLLMConfig:
  """Builds a config from an `InternVL*-hf` `config.json` dict."""
  if d.get("model_type") not in (None, "internvl"):
    raise ValueError(f"expected an InternVL config (model_type 'internvl'), got {d.get('model_type')!r}")
  v, t = dict(d.get("vision_config") or {}), dict(d.get("text_config") or {})
  vision = VisionConfig(
      hidden_size=v.get("hidden_size", 1024),
      intermediate_size=v.get("intermediate_size", 4096),
      num_hidden_layers=v.get("num_hidden_layers", 24),
      num_attention_heads=v.get("num_attention_heads", 16),
      image_size=_scalar(v.get("image_size", 448)),
      patch_size=_scalar(v.get("patch_size", 14)),
      num_channels=v.get("num_channels", 3),
      attention_bias=v.get("attention_bias", False),
      use_qk_norm=v.get("use_qk_norm", False),
      norm_type=v.get("norm_type", "layer_norm"),
      layer_norm_eps=v.get("layer_norm_eps", 1e-6),
      layer_scale_init_value=v.get("layer_scale_init_value", 0.1),
      hidden_act=v.get("hidden_act", "gelu"),
  )
  if v.get("use_mean_pooling", True) is False:
    raise ValueError("vision use_mean_pooling=False (a final ViT LayerNorm) is not supported")
  tie = d["tie_word_embeddings"] if "tie_word_embeddings" in d else t.get("tie_word_embeddings", False)
  heads = t.get("num_attention_heads", 14)
  rope_theta = t.get("rope_theta")
  if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
    rope_theta = (t.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
  text = TextConfig(
      model_type=t.get("model_type", "qwen2"),
      vocab_size=t.get("vocab_size", 151674),
      hidden_size=t.get("hidden_size", 896),
      intermediate_size=t.get("intermediate_size", 4864),
      num_hidden_layers=t.get("num_hidden_layers", 24),
      num_attention_heads=heads,
      num_key_value_heads=t.get("num_key_value_heads", heads),
      head_dim=t.get("head_dim") or t.get("hidden_size", 896) // heads,
      rope_theta=float(rope_theta),
      rms_norm_eps=t.get("rms_norm_eps", 1e-6),
      max_position_embeddings=t.get("max_position_embeddings", 32768),
      tie_word_embeddings=tie,  # transformers >= 5 ties by the top-level flag
      hidden_act=t.get("hidden_act", "silu"),
  )
  layer = d.get("vision_feature_layer", -1)
  if isinstance(layer, (list, tuple)):
    raise ValueError("a list of vision_feature_layer values is not supported")
  return FaceLLMConfig(
      vision=vision,
      text=text,
      image_token_id=d.get("image_token_id", 151667),
      downsample_ratio=d.get("downsample_ratio", 0.5),
      projector_hidden_act=d.get("projector_hidden_act", "gelu"),
      vision_feature_layer=layer,
      vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
  )


def to_hf_dict(c: FaceLLMConfig) -> dict[str, Any]:
  """The `config.json` dict that transformers' `InternVLConfig` reads back to the same model."""
  v, t = c.vision, c.text
  text = {
      "model_type": t.model_type,
      "vocab_size": t.vocab_size,
      "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size,
      "num_hidden_layers": t.num_hidden_layers,
      "num_attention_heads": t.num_attention_heads,
      "num_key_value_heads": t.num_key_value_heads,
      "head_dim": t.head_dim,
      "rope_theta": t.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
      "rms_norm_eps": t.rms_norm_eps,
      "max_position_embeddings": t.max_position_embeddings,
      "tie_word_embeddings": t.tie_word_embeddings,
      "hidden_act": t.hidden_act,
      "attention_bias": False if t.model_type == "qwen3" else None,
      "use_sliding_window": False,
  }
  text = {k: val for k, val in text.items() if val is not None}
  return {
      "model_type": "internvl",
      "architectures": ["InternVLForConditionalGeneration"],
      "vision_config": {
          "model_type": "internvl_vision",
          "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size,
          "num_hidden_layers": v.num_hidden_layers,
          "num_attention_heads": v.num_attention_heads,
          "image_size": [v.image_size, v.image_size],
          "patch_size": [v.patch_size, v.patch_size],
          "num_channels": v.num_channels,
          "attention_bias": v.attention_bias,
          "use_qk_norm": v.use_qk_norm,
          "norm_type": v.norm_type,
          "layer_norm_eps": v.layer_norm_eps,
          "layer_scale_init_value": v.layer_scale_init_value,
          "hidden_act": v.hidden_act,
          "use_mean_pooling": True,
      },
      "text_config": text,
      "image_token_id": c.image_token_id,
      "image_seq_length": c.image_seq_length,
      "downsample_ratio": c.downsample_ratio,
      "projector_hidden_act": c.projector_hidden_act,
      "vision_feature_layer": c.vision_feature_layer,
      "vision_feature_select_strategy": c.vision_feature_select_strategy,
      "tie_word_embeddings": t.tie_word_embeddings,
  }


def from_config_dict(d: Any) -> FaceLLMConfig:
  """From the `model` block of an ml_collections config (keys as in the dataclasses).

  The block also carries `hf_checkpoint` (where the weights come from), which is not architecture.
  """
  d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
  d.pop("hf_checkpoint", None)
  vision, text = d.pop("vision"), d.pop("text")
  return FaceLLMConfig(vision=VisionConfig(**vision), text=TextConfig(**text), **d)


def to_config_dict(c: FaceLLMConfig) -> dict[str, Any]:
  return dataclasses.asdict(c)
