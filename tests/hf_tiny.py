"""Tiny random `InternVLForConditionalGeneration` checkpoints built offline, for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_TOKEN_ID = 120


def make_hf_model(text_type: str = "qwen2", norm: str = "layer_norm", qk_norm: bool = False, tie: bool = False,
                  kv_heads: int = 2, image_size: int = 56, feature_layer: int = -1, seed: int = 0,
                  scale: float = 0.2):
  """A transformers InternVL with *every* parameter randomized, so an unmapped one cannot hide."""
  import torch
  from transformers import InternVLConfig, InternVLForConditionalGeneration

  torch.manual_seed(seed)
  cfg = InternVLConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=image_size, patch_size=14, use_qk_norm=qk_norm, norm_type=norm,
                         attention_bias=True),
      text_config=dict(model_type=text_type, vocab_size=128, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                       tie_word_embeddings=tie, rope_parameters=dict(rope_type="default", rope_theta=5000.0)),
      image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=tie, vision_feature_layer=feature_layer)
  model = InternVLForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * scale)
  return model


def save_hf_model(model, path: Path) -> Path:
  model.save_pretrained(path)
  return path


def random_inputs(image_size: int, image_tokens: int, offsets=(3, 10), length: int = 24, seed: int = 0):
  """Two rows with one image each at different offsets; NHWC pixels."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 100, (len(offsets), length + image_tokens)).astype(np.int32)
  for row, off in enumerate(offsets):
    ids[row, off:off + image_tokens] = IMAGE_TOKEN_ID
  pixels = rng.normal(size=(len(offsets), image_size, image_size, 3)).astype(np.float32)
  return ids, pixels


def hf_logits(model, ids: np.ndarray, pixels: np.ndarray | None) -> np.ndarray:
  import torch

  with torch.no_grad():
    pv = None if pixels is None else torch.tensor(pixels).permute(0, 3, 1, 2)
    return model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=pv).logits.float().numpy()


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())
