"""Device mesh and parameter sharding from the logical axis names every parameter carries.

One rules table maps logical axes onto the mesh axes `data`, `fsdp` and `tensor`:
- `data`: pure data parallelism; parameters are replicated across it.
- `fsdp`: the batch is split across it too, and each weight's embedding-like axis is sharded
  over it (ZeRO-3 style: weights are all-gathered just in time by XLA).
- `tensor`: Megatron-style tensor parallelism over heads, MLP width and vocabulary.
A dimension a mesh axis does not divide (a small kv-heads projection, an odd vocabulary) is
left unsharded along that axis rather than failing; `assert_sharded` then catches any large
weight that ended up fully replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from facellm_jax.models import stack
from facellm_jax.models.config import FaceLLMConfig
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.models.lora import LoRAConfig, apply_lora

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (in order of preference). The weight's "embed" side goes to fsdp,
# the side that grows with heads / MLP width / vocabulary to tensor, so a matmul's two operands
# never compete for the same mesh axis. `None` (LoRA's rank, patch-kernel taps) never shards.
LOGICAL_RULES: Mapping[str | None, tuple[str, ...]] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "norm": (),
    "vit_embed": ("fsdp",),
    "vit_mlp": ("tensor",),
    "vit_heads": ("tensor",),
    "layers": (),  # the leading axis of scanned layers (models/stack.py): every device holds every layer
    None: (),
}

# Below every weight matrix of the released sizes, above every norm/bias vector: vectors may stay
# replicated by design, matrices may not.
DEFAULT_MIN_SIZE = 2**16


class ShardingError(ValueError):
  """A mesh that does not fit the devices, or weights that are not sharded as they should be."""


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all); one size may be -1 (the rest).

  Axes are `AxisType.Auto`: the model code carries no per-op sharding annotations, so XLA's
  propagation from the parameter and batch shardings decides the intermediates. Explicit axes
  (jax's default) would instead make every ambiguous op (e.g. an einsum whose operands share a
  mesh axis) a trace-time error.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ShardingError(f"mesh.shape has unknown axes {unknown}; expected a subset of {list(MESH_AXES)}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  described = ", ".join(f"{a}={s}" for a, s in sizes.items())
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  fill = [a for a, s in sizes.items() if s == -1]
  if bad or len(fill) > 1:
    raise ShardingError(f"mesh.shape ({described}): sizes must be >= 1, with at most one -1 (the rest)")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if len(devices) % known:
      raise ShardingError(f"mesh.shape ({described}): {len(devices)} devices are not divisible by {known}")
    sizes[fill[0]] = len(devices) // known
  elif known != len(devices):
    raise ShardingError(f"mesh.shape ({described}) needs {known} devices but {len(devices)} are available; "
                        "set one axis to -1 to use the rest")
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping[str | None, tuple[str, ...]] = LOGICAL_RULES) -> P:
  """The PartitionSpec for a tensor with logical `axes`, skipping mesh axes that do not divide."""
  if len(axes) != len(shape):
    raise ShardingError(f"logical axes {tuple(axes)} do not match the shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name not in rules:
      raise ShardingError(f"no sharding rule for logical axis {name!r}; known: {sorted(map(str, rules))}")
    kept, size = [], 1
    for mesh_axis in rules[name]:
      n = mesh.shape[mesh_axis]
      if mesh_axis not in used and dim % (size * n) == 0:
        kept.append(mesh_axis)
        size *= n
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State | nnx.Module, mesh: Mesh) -> nnx.State:
  """A state-shaped tree of `NamedSharding`s from each Variable's `axes` metadata.

  Works on concrete and `nnx.eval_shape` (abstract) states alike, optimizer state included (its
  moments inherit their parameter's `axes`); anything without `axes` is replicated. The result
  is what `jax.jit(out_shardings=...)`, `jax.device_put` and `hf.load_pretrained(shardings=...)` take.
  """
  if isinstance(state, nnx.Module):
    state = nnx.state(state)

  def one(path, var):
    axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
    if axes is None:
      return NamedSharding(mesh, P())
    try:
      return NamedSharding(mesh, partition_spec(axes, var.shape, mesh))
    except ShardingError as e:
      raise ShardingError(f"{jax.tree_util.keystr(path, simple=True, separator='.')}: {e}") from None

  return jax.tree.map_with_path(one, state, is_leaf=_is_variable)


def create_model(config: FaceLLMConfig, mesh: Mesh, *, seed: int = 0, dtype=jnp.float32,
                 param_dtype=jnp.float32, lora: LoRAConfig | None = None, scan_layers: bool = False) -> FaceLLM:
  """A freshly initialized model whose every parameter is born sharded on `mesh`.

  The init runs under `jax.jit` with `out_shardings`, so each device only ever computes and
  holds its own shards. It draws the same random numbers as an eager
  `FaceLLM(config, rngs=nnx.Rngs(seed))` (then `apply_lora` on the same rngs when `lora` is given),
  so the weights match that build up to float32 rounding; `scan_layers` then stacks both towers'
  layers (`models.stack.stack`: the same weights, scanned layout).
  """

  def build() -> FaceLLM:
    rngs = nnx.Rngs(seed)
    model = FaceLLM(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    model = model if lora is None else apply_lora(model, lora, rngs)
    return stack.stack(model) if scan_layers else model

  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  init = jax.jit(lambda: nnx.split(build())[1], out_shardings=state_shardings(abstract_state, mesh))
  return nnx.merge(graphdef, init())


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Moves an existing model's parameters onto `mesh` by the rules, in place; returns `model`."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
  return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp; the batch size must divide by their product."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def assert_sharded(model: nnx.Module | nnx.State, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> None:
  """Raises `ShardingError` naming every weight of >= `min_size` elements that some device holds whole.

  A no-op on a mesh without model parallelism (fsdp = tensor = 1), where replication is the plan.
  """
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return
  state = nnx.state(model) if isinstance(model, nnx.Module) else model
  offenders = []
  for path, var in nnx.to_flat_state(state):
    is_var = isinstance(var, nnx.Variable)
    x = var.get_value() if is_var else var
    if x.size < min_size:
      continue
    sharding = getattr(x, "sharding", None)
    if sharding is None or sharding.shard_shape(x.shape) == tuple(x.shape):
      spec = getattr(sharding, "spec", sharding)
      offenders.append(f"  {'.'.join(map(str, path))} {tuple(x.shape)} axes={var.get_metadata().get('axes') if is_var else None} "
                       f"sharding={spec}")
  if offenders:
    mesh_desc = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    raise ShardingError(
        f"{len(offenders)} weight(s) of >= {min_size} elements are replicated on the mesh ({mesh_desc}); "
        "create the model with create_model or shard_model so each follows its logical axes:\n"
        + "\n".join(offenders))
