"""Qwen2 (InternVL3) and Qwen3 (InternVL3.5) decoders with an optional fixed-length KV cache."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from facellm_jax.models import stack
from facellm_jax.models.attention import Segments
from facellm_jax.models.config import TextConfig
from facellm_jax.models.layers import Linear, RMSNorm, Rngs, activation, attention, dense, init_keys, param

Array = jax.Array


class LayerCache(NamedTuple):
  k: Array  # [B, S, K, H]
  v: Array  # [B, S, K, H]


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding in HF's half-split layout. x [B, T, N, H], positions [B, T]."""
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, rngs: Rngs, dtype, param_dtype):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Linear(d, n * h, use_bias=cfg.qkv_bias, axes=("embed", "q_heads"), **kw)
    self.k_proj = Linear(d, k * h, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(d, k * h, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(n * h, d, use_bias=False, axes=("q_heads", "embed"), **kw)
    self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype) if cfg.qk_norm else None
    self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype) if cfg.qk_norm else None
    self.n, self.k, self.h, self.theta = n, k, h, cfg.rope_theta
    self.attn_impl: str | None = None

  def __call__(self, x: Array, positions: Array, mask: Array, cache: LayerCache | None,
               cache_index: Array | None) -> tuple[Array, LayerCache | None]:
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.n, self.h)
    k = self.k_proj(x).reshape(b, t, self.k, self.h)
    v = self.v_proj(x).reshape(b, t, self.k, self.h)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
      v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
      cache = LayerCache(k, v)
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.attn_impl, causal=cache is None)
    return self.o_proj(out.reshape(b, t, self.n * self.h)), cache


class MLP(nnx.Module):

  def __init__(self, cfg: TextConfig, rngs: Rngs, dtype, param_dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, rngs: Rngs, dtype, param_dtype):
    self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.attn = Attention(cfg, rngs, dtype, param_dtype)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.mlp = MLP(cfg, rngs, dtype, param_dtype)

  def __call__(self, x, positions, mask, cache, cache_index):
    h, cache = self.attn(self.input_norm(x), positions, mask, cache, cache_index)
    x = x + h.astype(x.dtype)
    x = x + self.mlp(self.post_attn_norm(x)).astype(x.dtype)
    return x, cache


class LanguageModel(nnx.Module):
  """Token embedding, decoder stack, final norm and LM head (tied or untied)."""

  def __init__(self, cfg: TextConfig, rngs: Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.cfg, self.dtype = cfg, dtype
    rngs = init_keys(rngs)
    self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs, dtype, param_dtype) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype))
    self.remat = "none"  # train.remat (models/stack.py); the KV-cache path never rematerializes

  def embed_tokens(self, ids: Array) -> Array:
    return jnp.take(self.embed[...], ids, axis=0).astype(self.dtype)

  def __call__(self, x: Array, positions: Array, mask: Array, cache: list[LayerCache] | None = None,
               cache_index: Array | None = None) -> tuple[Array, list[LayerCache] | None]:
    """x [B, T, D] embeddings -> final-normed hidden states [B, T, D] (and the updated cache).

    Without a cache the attention is causal and `mask` (`Segments` or None) only adds packing
    boundaries; with one, `mask` [B, 1, T, S] alone says which cache slots each query sees.
    """
    if cache is None:
      x = stack.run(self.layers, x, lambda layer, h: layer(h, positions, mask, None, None)[0], remat=self.remat)
      return self.norm(x), None
    if isinstance(self.layers, stack.Stacked):
      raise ValueError("a KV cache needs the unrolled layers: convert with models.stack.unstack first")
    new_cache = []
    for layer, c in zip(self.layers, cache):
      x, c = layer(x, positions, mask, c, cache_index)
      new_cache.append(c)
    return self.norm(x), new_cache

  def logits(self, hidden: Array) -> Array:
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return dense(hidden.astype(self.dtype), w.astype(self.dtype), jnp.float32)

  def init_cache(self, batch: int, length: int, dtype=None) -> list[LayerCache]:
    c = self.cfg
    shape = (batch, length, c.num_key_value_heads, c.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype or self.dtype)
    return [LayerCache(zeros(), zeros()) for _ in range(c.num_hidden_layers)]


def segment_mask(segment_ids: Array | None) -> Segments | None:
  """The packing mask (query and key in the same segment) as `Segments` (None: one sequence per row).

  Causality is not in it: every forward without a cache is causal (see `attention`).
  """
  if segment_ids is None:
    return None
  return Segments(segment_ids)
