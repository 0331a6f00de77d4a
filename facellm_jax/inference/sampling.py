"""Next-token choice from logits: greedy, or temperature -> top-k -> top-p (nucleus) as in HF."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick a token. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample(logits: Array, key: Array, sampling: Sampling) -> Array:
  """[B, V] logits -> [B] int32 tokens.

  Row r draws with `fold_in(key, r)`, so a prompt gets the same tokens whatever else shares
  its batch (as long as it sits in the same row).
  """
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  vocab = logits.shape[-1]
  k = vocab if sampling.top_k == 0 else min(sampling.top_k, vocab)
  values, indices = jax.lax.top_k(logits, k)  # sorted, largest first
  if sampling.top_p < 1.0:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest prefix holding top_p of the mass; the first token always stays.
    values = jnp.where(mass_before < sampling.top_p, values, -jnp.inf)
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(logits.shape[0]))
  choice = jax.vmap(jax.random.categorical)(keys, values)
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
