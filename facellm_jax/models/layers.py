"""Building blocks shared by the vision tower, the projector and the language model.

Every parameter carries `axes`: logical axis names that `models/sharding.py` maps onto the
device mesh. Parameters live in `param_dtype` (float32 master weights); matmuls run in `dtype`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from facellm_jax.models.attention import Segments, splash, xla_attention

Array = jax.Array


class InitKeys:
  """Parameter-init keys `fold_in(base, 0), fold_in(base, 1), ...` with the counter in Python.

  Drawing `rngs.params()` per parameter bumps nnx's counter Variable, and under tracing
  (`nnx.eval_shape`, the jitted sharded init) each bump makes JAX walk the whole trace to word an
  error message it never raises: building the abstract 38B model took 10-30 s, quadratic in the
  parameter count. Here the Rngs gives one base key per model; fold_in keys are independent
  draws, so the init statistics are unchanged, and eager and traced builds get the same weights.
  """

  def __init__(self, rngs: nnx.Rngs):
    self.base = rngs.params()
    self.count = 0

  def __call__(self) -> Array:
    key = jax.random.fold_in(self.base, self.count)
    self.count += 1
    return key


Rngs = nnx.Rngs | InitKeys


def init_keys(rngs: Rngs) -> InitKeys:
  """The model-wide key stream: module constructors accept either and pass this one down."""
  return rngs if isinstance(rngs, InitKeys) else InitKeys(rngs)


def param(rngs: Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = "normal", scale: float = 0.02) -> nnx.Param:
  """A parameter with logical axis names, drawn from `init_keys(rngs)` when random."""
  if init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "const":
    value = jnp.full(shape, scale, dtype)
  else:
    value = scale * jax.random.normal(init_keys(rngs)(), shape, dtype)
  return nnx.Param(value, axes=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: Array, kernel: Array, out_dtype=None) -> Array:
  """x [..., in] @ kernel [in, out], with the weight gradient spelled out as one token contraction.

  JAX's own transpose of `x @ kernel` leaves XLA:CPU a dot that wants the activation gradient
  transposed, and it fuses that transpose into the elementwise backward (SiLU, softmax) with
  strided reads: on a 2-core EPYC that copy cost as much as the matmuls. Written as
  `einsum("...i,...o->io")` the gradient needs no such copy (MLP backward 1.8x faster); on GPU
  both forms are one GEMM. The input gradient is computed in the input's dtype.
  """
  return jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=out_dtype)


def _dense_fwd(x, kernel, out_dtype):
  return dense(x, kernel, out_dtype), (x, kernel)


def _dense_bwd(out_dtype, residuals, dy):
  del out_dtype
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  dx = jnp.einsum("...o,io->...i", dy, kernel)
  dkernel = jnp.einsum("...i,...o->io", x, dy, preferred_element_type=kernel.dtype)
  return dx, dkernel


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out]; `lora` is filled by `models.lora.apply_lora`."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
               axes: tuple[str | None, str | None], rngs: Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.in_features, self.out_features = in_features, out_features
    self.kernel = param(rngs, (in_features, out_features), axes, param_dtype,
                        scale=1.0 / math.sqrt(in_features))
    self.bias = param(rngs, (out_features,), (axes[1],), param_dtype, "zeros") if use_bias else None
    self.dtype = dtype
    self.lora = None

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    y = dense(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x)
    return y


class RMSNorm(nnx.Module):
  """Qwen / InternViT-6B RMSNorm: normalize in float32, scale after casting back."""

  def __init__(self, dim: int, *, eps: float, rngs: Rngs, axes=("norm",), param_dtype=jnp.float32):
    self.scale = param(rngs, (dim,), axes, param_dtype, "ones")
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * x32.astype(dtype)


class LayerNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, rngs: Rngs, axes=("norm",), param_dtype=jnp.float32):
    self.scale = param(rngs, (dim,), axes, param_dtype, "ones")
    self.bias = param(rngs, (dim,), axes, param_dtype, "zeros")
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(dtype)


def make_norm(kind: str, dim: int, eps: float, rngs: Rngs, param_dtype) -> nnx.Module:
  cls = {"layer_norm": LayerNorm, "rms_norm": RMSNorm}[kind]
  return cls(dim, eps=eps, rngs=rngs, param_dtype=param_dtype)


def activation(name: str):
  try:
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }[name]
  except KeyError:
    raise ValueError(f"unsupported activation {name!r}") from None


def attention(q: Array, k: Array, v: Array, mask: Array | Segments | None = None, implementation: str | None = None,
              *, causal: bool = False) -> Array:
  """Multi-head / grouped-query attention, the one door to every kernel. q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H].

  `mask` is a boolean array broadcastable to [B,N,T,S] (True = keep) or the `Segments` of packed
  rows; `causal` also hides the keys after each query (queries being the last T of the S
  positions), without a [T,S] mask input: the XLA path builds it from iotas per block of queries,
  cuDNN and splash skip masked blocks. `implementation`: None/'xla', 'cudnn', 'splash' (TPU;
  self-attention with `Segments` or no mask) or 'splash_interpret' (the same kernel in Pallas'
  interpreter, for CPU tests); see `models/attention.py`. Softmax runs in float32; fully masked
  rows stay finite (the XLA path masks with a large negative number), which keeps padded rows
  NaN-free in packed batches.
  """
  if implementation in ("splash", "splash_interpret"):
    if mask is not None and not isinstance(mask, Segments):
      raise ValueError("splash attention takes packing masks as Segments only (no KV-cache decoding)")
    return splash(q, k, v, mask, causal=causal, interpret=implementation == "splash_interpret")
  if implementation not in (None, "xla"):
    mask = mask.mask() if isinstance(mask, Segments) else mask
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
  return xla_attention(q, k, v, mask, causal)
