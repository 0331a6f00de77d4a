"""The layer stacks of both towers: rematerialization, and the scanned (stacked) layout.

Unrolled, a tower's `layers` is an `nnx.List` of identical blocks (the layout of inference, the KV
cache and the HF checkpoints). Scanned (`train.scan_layers`), it is one `Stacked` module whose
block holds every Variable with a leading [L] axis, logical name "layers" (never sharded), and
the forward is one `lax.scan` over it: XLA compiles one block instead of L, which is what makes the
38B train step (64 + 45 blocks) compile in minutes. `stack` / `unstack` convert between the two
(same values, same paths below the block: `language.layers.3.attn.q_proj.kernel` is slice 3 of
`language.layers.layer.attn.q_proj.kernel`, see `stacked_path` / `unrolled_path`, which is how
`hf.py` reads and writes the scanned layout through its one table).

`train.remat` wraps each block's forward in `jax.checkpoint` (the scan body when stacked):
'none' keeps every activation for the backward, 'full' keeps only the block inputs and recomputes
the rest, 'dots' also keeps the matmul outputs without batch dimensions
(`checkpoint_dots_with_no_batch_dims`: the projections' [tokens, features] outputs, not the
attention's per-head [B, N, T, S] products, which a batched dot would save).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
LAYER_AXIS = "layers"  # the logical name of the stacked axis (models/sharding.py: never sharded)
_TOWERS = ("language", "vision")
_UNROLLED = re.compile(r"^(.*\.layers)\.(\d+)\.(.*)$")
_STACKED = re.compile(r"^(.*\.layers)\.layer\.(.*)$")


class Stacked(nnx.Module):
  """`length` copies of one block as a single module: every Variable of `layer` is [length, ...]."""

  def __init__(self, layer: nnx.Module, length: int):
    self.layer = layer
    self.length = length

  def __len__(self) -> int:
    return self.length


def check_remat(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"train.remat must be one of {list(REMAT_POLICIES)}, got {policy!r}")


def run(layers: nnx.List | Stacked, x: Array, call: Callable[[nnx.Module, Array], Array], *,
        remat: str = "none", stop: int | None = None) -> Array:
  """`x` through the first `stop` (default all) blocks, `call(block, x) -> x` each, under `remat`."""
  check_remat(remat)

  def block(graphdef: nnx.GraphDef) -> Callable[[nnx.State, Array], Array]:
    fn = lambda state, h: call(nnx.merge(graphdef, state), h)
    if remat == "none":
      return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=not isinstance(layers, Stacked))

  if isinstance(layers, Stacked):
    graphdef, state = nnx.split(layers.layer)
    if stop is not None and stop < layers.length:
      state = jax.tree.map(lambda v: v[:stop], state)
    body = block(graphdef)
    x, _ = jax.lax.scan(lambda h, s: (body(s, h), None), x, state)
    return x
  for layer in list(layers)[:stop]:
    if remat == "none":
      x = call(layer, x)
    else:
      graphdef, state = nnx.split(layer)
      x = block(graphdef)(state, x)
  return x


def _stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module of `modules[0]`'s graph whose Variables are the stacked [L, ...] values."""
  graphdef, *_ = nnx.split(modules[0])
  states = [nnx.state(m) for m in modules]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  for _, var in nnx.to_flat_state(stacked):
    axes = var.get_metadata().get("axes")
    if axes is not None:
      var.set_metadata(axes=(LAYER_AXIS, *axes))
  return nnx.merge(graphdef, stacked)


def stack_layers(layers: nnx.List) -> Stacked:
  return Stacked(_stack_modules(list(layers)), len(layers))


def unstack_layers(stacked: Stacked) -> nnx.List:
  graphdef, state = nnx.split(stacked.layer)
  out = []
  for i in range(stacked.length):
    one = jax.tree.map(lambda v, i=i: v[i], state)
    for _, var in nnx.to_flat_state(one):
      axes = var.get_metadata().get("axes")
      if axes is not None and axes and axes[0] == LAYER_AXIS:
        var.set_metadata(axes=tuple(axes[1:]))
    out.append(nnx.merge(graphdef, one))
  return nnx.List(out)


def stack_adapters(adapters: list[nnx.Module]) -> nnx.Module:
  """Per-layer LoRA adapters of one target as the stacked adapter of its `Stacked` block."""
  return _stack_modules(adapters)


def is_stacked(model: nnx.Module) -> bool:
  return any(isinstance(getattr(model, t).layers, Stacked) for t in _TOWERS if hasattr(model, t))


def stack(model: nnx.Module) -> nnx.Module:
  """Both towers' layers stacked (the scanned training layout), in place; returns `model`.

  Run it where the values are arrays or tracers (inside the jitted or `nnx.eval_shape` build).
  """
  for tower in _TOWERS:
    t = getattr(model, tower)
    if not isinstance(t.layers, Stacked):
      t.layers = stack_layers(t.layers)
  return model


def unstack(model: nnx.Module) -> nnx.Module:
  """The inference layout of a model in either layout: unrolled layers, no remat; in place.

  Inference (the KV cache, `generate.py`), merging and HF export all work on this layout; a
  workdir trained with `train.scan_layers` comes through here once (`inference/load.py`).
  """
  for tower in _TOWERS:
    t = getattr(model, tower)
    if isinstance(t.layers, Stacked):
      t.layers = unstack_layers(t.layers)
    t.remat = "none"
  return model


def set_remat(model: nnx.Module, policy: str) -> nnx.Module:
  """`train.remat` on both towers' layer stacks, in place (the KV-cache path never rematerializes)."""
  check_remat(policy)
  for tower in _TOWERS:
    getattr(model, tower).remat = policy
  return model


def stacked_path(path: str) -> tuple[str, int] | None:
  """`a.layers.3.b` -> (`a.layers.layer.b`, 3): the stacked Variable and the slice of an unrolled path."""
  m = _UNROLLED.match(path)
  return None if m is None else (f"{m.group(1)}.layer.{m.group(3)}", int(m.group(2)))


def unrolled_path(path: str, index: int) -> str | None:
  """`a.layers.layer.b`, 3 -> `a.layers.3.b` (None for a path outside a stacked block)."""
  m = _STACKED.match(path)
  return None if m is None else f"{m.group(1)}.{index}.{m.group(2)}"
