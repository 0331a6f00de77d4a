"""LoRA adapters on the model's `Linear` layers, and the filters that pick what trains.

The paper fine-tunes with r=16, alpha=32 on every linear layer of the language model. Adapters
hang off `Linear.lora` rather than replacing the layer, so the base parameter tree (and hence
checkpoint import/export) is unchanged. Their weights are `nnx.LoRAParam`, a `Param` subclass:
the optimizer (`wrt=nnx.LoRAParam`), gradients (`nnx.DiffState(0, nnx.LoRAParam)`) and
checkpoints select them by type alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from facellm_jax.models import stack
from facellm_jax.models.config import FaceLLMConfig
from facellm_jax.models.layers import Linear, Rngs, init_keys

Array = jax.Array

_MODULES = ("language", "vision", "projector")
_LANGUAGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which `Linear`s get adapters (by attribute name, inside the listed top-level towers).

  The vision tower names its layers q/k/v/out_proj and fc1/fc2, the projector linear_1/2:
  add those names to `targets` together with "vision"/"projector" in `modules`.
  """

  rank: int = 16
  alpha: float = 32.0
  targets: tuple[str, ...] = _LANGUAGE_TARGETS
  modules: tuple[str, ...] = ("language",)

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    unknown = [m for m in self.modules if m not in _MODULES]
    if unknown or not self.modules:
      raise ValueError(f"LoRA modules must be a non-empty subset of {_MODULES}, got {self.modules}")
    if not self.targets:
      raise ValueError("LoRA targets is empty: name at least one Linear attribute, e.g. 'q_proj'")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoRAAdapter(nnx.Module):
  """The low-rank update `(x @ a @ b) * alpha / rank` added to a Linear's output.

  `a` starts uniform in +-1/sqrt(in) (peft's kaiming-uniform with a=sqrt(5)) and `b` at zero,
  so a fresh adapter leaves the model's output exactly unchanged.
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int, scale: float,
               axes: tuple[str | None, str | None], rngs: Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    bound = 1.0 / math.sqrt(in_features)
    a = jax.random.uniform(init_keys(rngs)(), (in_features, rank), param_dtype, -bound, bound)
    self.lora_a = nnx.LoRAParam(a, axes=(axes[0], None))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype), axes=(None, axes[1]))
    self.scale = scale
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    h = x.astype(self.dtype) @ self.lora_a[...].astype(self.dtype)
    return (h @ self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.scale, self.dtype)

  def delta(self) -> Array:
    """The float32 kernel update `a @ b * scale` that `merge_lora` folds in ([L, in, out] when stacked)."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return (a @ b) * self.scale


def _targets(model: nnx.Module, cfg: LoRAConfig) -> Iterator[tuple[tuple, Linear, int | None]]:
  """(path, Linear, layers) of every targeted Linear; `layers` is L inside a `Stacked` block, else None."""
  for name in cfg.modules:
    tower = getattr(model, name)
    stacked = isinstance(getattr(tower, "layers", None), stack.Stacked)
    for path, node in nnx.iter_modules(tower):
      if isinstance(node, Linear) and path and path[-1] in cfg.targets:
        inside = stacked and path[0] == "layers"
        yield (name, *path), node, len(tower.layers) if inside else None


def apply_lora(model: nnx.Module, cfg: LoRAConfig, rngs: Rngs, *, param_dtype=jnp.float32) -> nnx.Module:
  """Attaches a fresh adapter to every targeted Linear, in place; returns `model`.

  Adapters are float32 (`param_dtype`) even on a bfloat16 model: they are the weights that
  train, and the update is computed in the Linear's compute dtype either way. Keys come from one
  `InitKeys` stream (see `layers.InitKeys`: one nnx draw per adapter is quadratic under tracing),
  drawn in the unrolled model's order in both layouts: a `Stacked` block's adapters are made
  layer by layer (layer-major, as the unrolled walk meets them) and stacked, so a scanned model
  gets exactly the adapters of the unrolled one.
  """
  rngs = init_keys(rngs)
  found: dict[str, int] = {t: 0 for t in cfg.targets}
  targets = list(_targets(model, cfg))
  for path, linear, _ in targets:
    if linear.lora is not None:
      raise ValueError(f"{'.'.join(map(str, path))} already has a LoRA adapter; merge_lora first")

  def adapter(linear: Linear, axes) -> LoRAAdapter:
    return LoRAAdapter(linear.in_features, linear.out_features, rank=cfg.rank, scale=cfg.scale,
                       axes=axes, rngs=rngs, dtype=linear.dtype, param_dtype=param_dtype)

  i = 0
  while i < len(targets):
    path, linear, layers = targets[i]
    if layers is None:
      axes = linear.kernel.get_metadata().get("axes", (None, None))
      # `Linear.lora` starts as static None; `nnx.data` makes the adapter part of the state.
      linear.lora = nnx.data(adapter(linear, axes))
      found[path[-1]] += 1
      i += 1
      continue
    group = [t for t in targets[i:] if t[0][0] == path[0] and t[2] is not None]  # one Stacked block's
    per_layer = [[adapter(lin, lin.kernel.get_metadata().get("axes", (None, None, None))[1:]) for _, lin, _ in group]
                 for _ in range(layers)]
    for j, (p, lin, _) in enumerate(group):
      lin.lora = nnx.data(stack.stack_adapters([row[j] for row in per_layer]))
      found[p[-1]] += layers
    i += len(group)
  missing = [t for t, n in found.items() if n == 0]
  if missing:
    raise ValueError(f"LoRA targets {missing} match no Linear under {cfg.modules}; "
                     "vision uses q/k/v/out_proj, fc1, fc2 and the projector linear_1, linear_2")
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel (in float32) and removes it, in place.

  The merged model has exactly the base parameter tree again, ready for `hf.save_pretrained`.
  """
  adapted = [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora is not None]
  for node in adapted:
    kernel = node.kernel[...]
    node.kernel.set_value((kernel.astype(jnp.float32) + node.lora.delta()).astype(kernel.dtype))
    node.lora = nnx.static(None)  # back to the base model's exact graph
  return model


def trainable_filter(kind: str) -> nnx.filterlib.Filter:
  """The nnx filter of the parameters a run trains, for `nnx.DiffState` and `nnx.Optimizer(wrt=...)`.

  'lora': only adapters; 'full': every parameter; 'all_but_vision': every parameter except
  the vision tower's (the projector and language model, plus any adapters there).
  """
  filters = {
      "lora": nnx.LoRAParam,
      "full": nnx.Param,
      "all_but_vision": nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision"))),
  }
  if kind not in filters:
    raise ValueError(f"unknown trainable kind {kind!r}; expected one of {sorted(filters)}")
  return filters[kind]


def lora_state(model: nnx.Module) -> nnx.State:
  """Only the adapter weights: what a LoRA run checkpoints."""
  return nnx.state(model, nnx.LoRAParam)


def count_params(model: nnx.Module, wrt: nnx.filterlib.Filter = nnx.Param) -> int:
  """Number of scalars in the variables `wrt` selects (works on `nnx.eval_shape` models too)."""
  return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, wrt)))


def lora_param_count(config: FaceLLMConfig, cfg: LoRAConfig) -> int:
  """Adapter parameters from the config alone: rank * (in + out) per targeted Linear.

  An independent count (it never builds the model) to check `apply_lora` against, and the
  number to report as "trainable parameters" for a LoRA run.
  """
  t, v = config.text, config.vision
  q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
  d_proj = v.hidden_size * int(1 / config.downsample_ratio) ** 2
  shapes = {
      "language": (t.num_hidden_layers, {
          "q_proj": (t.hidden_size, q), "k_proj": (t.hidden_size, kv), "v_proj": (t.hidden_size, kv),
          "o_proj": (q, t.hidden_size), "gate_proj": (t.hidden_size, t.intermediate_size),
          "up_proj": (t.hidden_size, t.intermediate_size), "down_proj": (t.intermediate_size, t.hidden_size)}),
      "vision": (v.num_hidden_layers, {
          "q_proj": (v.hidden_size,) * 2, "k_proj": (v.hidden_size,) * 2, "v_proj": (v.hidden_size,) * 2,
          "out_proj": (v.hidden_size,) * 2, "fc1": (v.hidden_size, v.intermediate_size),
          "fc2": (v.intermediate_size, v.hidden_size)}),
      "projector": (1, {"linear_1": (d_proj, t.hidden_size), "linear_2": (t.hidden_size, t.hidden_size)}),
  }
  total = 0
  for module in cfg.modules:
    repeat, linears = shapes[module]
    total += repeat * sum(cfg.rank * (i + o) for name, (i, o) in linears.items() if name in cfg.targets)
  return total
