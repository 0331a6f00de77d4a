"""InternViT, the vision tower of InternVL (300M with LayerNorm; 6B with RMSNorm + QK-norm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facellm_jax.models import stack
from facellm_jax.models.config import VisionConfig
from facellm_jax.models.layers import Linear, RMSNorm, Rngs, activation, attention, init_keys, make_norm, param

Array = jax.Array


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, rngs: Rngs, dtype, param_dtype):
    d = cfg.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Linear(d, d, use_bias=cfg.attention_bias, axes=("vit_embed", "vit_heads"), **kw)
    self.k_proj = Linear(d, d, use_bias=cfg.attention_bias, axes=("vit_embed", "vit_heads"), **kw)
    self.v_proj = Linear(d, d, use_bias=cfg.attention_bias, axes=("vit_embed", "vit_heads"), **kw)
    self.out_proj = Linear(d, d, use_bias=True, axes=("vit_heads", "vit_embed"), **kw)
    # InternViT-6B normalizes q and k over the full width, before the head split.
    self.q_norm = RMSNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype) if cfg.use_qk_norm else None
    self.k_norm = RMSNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype) if cfg.use_qk_norm else None
    self.num_heads = cfg.num_attention_heads
    self.attn_impl: str | None = None  # as the language model's: None/"xla" or "cudnn"

  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    out = attention(split(q), split(k), split(v), None, self.attn_impl)
    return self.out_proj(out.reshape(b, t, d))


class VisionLayer(nnx.Module):
  """Pre-norm block with per-channel layer scale (lambda_1/lambda_2) on both residual branches."""

  def __init__(self, cfg: VisionConfig, rngs: Rngs, dtype, param_dtype):
    d = cfg.hidden_size
    self.norm1 = make_norm(cfg.norm_type, d, cfg.layer_norm_eps, rngs, param_dtype)
    self.attn = VisionAttention(cfg, rngs, dtype, param_dtype)
    self.scale1 = param(rngs, (d,), ("vit_embed",), param_dtype, "const", cfg.layer_scale_init_value)
    self.norm2 = make_norm(cfg.norm_type, d, cfg.layer_norm_eps, rngs, param_dtype)
    self.scale2 = param(rngs, (d,), ("vit_embed",), param_dtype, "const", cfg.layer_scale_init_value)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Linear(d, cfg.intermediate_size, use_bias=True, axes=("vit_embed", "vit_mlp"), **kw)
    self.fc2 = Linear(cfg.intermediate_size, d, use_bias=True, axes=("vit_mlp", "vit_embed"), **kw)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x: Array) -> Array:
    x = x + self.scale1[...].astype(x.dtype) * self.attn(self.norm1(x)).astype(x.dtype)
    h = self.fc2(self.act(self.fc1(self.norm2(x))))
    return x + self.scale2[...].astype(x.dtype) * h.astype(x.dtype)


def interpolate_pos_embed(pos: Array, grid: int) -> Array:
  """Bicubic resize of the [1 + n*n, D] table to a `grid` x `grid` patch grid (CLS row kept).

  torch's bicubic (a = -0.75, align_corners=False) differs slightly from `jax.image.resize`'s
  Keys kernel (a = -0.5), so we build torch's interpolation matrix explicitly.
  """
  n = int(round((pos.shape[0] - 1) ** 0.5))
  if n == grid:
    return pos
  w = _bicubic_matrix(n, grid)
  patches = pos[1:].reshape(n, n, -1).astype(jnp.float32)
  patches = jnp.einsum("in,jm,nmd->ijd", w, w, patches).reshape(grid * grid, -1)
  return jnp.concatenate([pos[:1], patches.astype(pos.dtype)], axis=0)


def _bicubic_matrix(n_in: int, n_out: int) -> Array:
  a = -0.75

  def cubic(x):
    x = abs(x)
    if x <= 1:
      return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
      return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0

  m = np.zeros((n_out, n_in), np.float32)
  scale = n_in / n_out
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k in range(-1, 3):
      m[i, min(max(base + k, 0), n_in - 1)] += cubic(k - t)
  return jnp.asarray(m)


class VisionModel(nnx.Module):
  """Patch embedding + CLS + learned positions + encoder; returns every layer's hidden states."""

  def __init__(self, cfg: VisionConfig, rngs: Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.cfg, self.dtype = cfg, dtype
    rngs = init_keys(rngs)
    d, p = cfg.hidden_size, cfg.patch_size
    self.patch_kernel = param(rngs, (p, p, cfg.num_channels, d), (None, None, None, "vit_embed"), param_dtype)
    self.patch_bias = param(rngs, (d,), ("vit_embed",), param_dtype, "zeros")
    self.cls_token = param(rngs, (d,), ("vit_embed",), param_dtype)
    self.pos_embed = param(rngs, (cfg.num_patches + 1, d), (None, "vit_embed"), param_dtype)
    self.layers = nnx.List([VisionLayer(cfg, rngs, dtype, param_dtype) for _ in range(cfg.num_hidden_layers)])
    self.remat = "none"  # train.remat (models/stack.py)

  def embed(self, pixel_values: Array) -> Array:
    """NHWC pixels -> [N, 1 + patches, D]."""
    n, h, w, _ = pixel_values.shape
    p = self.cfg.patch_size
    if h != w or h % p:
      raise ValueError(f"images must be square with a side divisible by {p}, got {h}x{w}")
    x = pixel_values.astype(self.dtype).reshape(n, h // p, p, w // p, p, -1)
    x = jnp.einsum("nipjqc,pqcd->nijd", x, self.patch_kernel[...].astype(self.dtype))
    x = x.reshape(n, -1, x.shape[-1]) + self.patch_bias[...].astype(self.dtype)
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + interpolate_pos_embed(self.pos_embed[...], h // p).astype(self.dtype)[None]

  def __call__(self, pixel_values: Array, feature_layer: int = -1) -> Array:
    """Hidden states after `feature_layer` (HF indexing: 0 = embeddings, -1 = last layer)."""
    num = len(self.layers)
    stop = feature_layer % (num + 1)
    return stack.run(self.layers, self.embed(pixel_values), lambda layer, h: layer(h), remat=self.remat, stop=stop)
