"""The attention kernels behind `layers.attention`, and the config's choice among them.

`train.attention` picks one per run: 'xla' (any platform: einsums + softmax, the scores held in
float32, `xla_attention`), 'cudnn' (GPU flash attention through `jax.nn.dot_product_attention`), 'splash'
(TPU: the Pallas splash-attention kernel, which never holds the [T, S] scores in HBM), or 'auto'
= splash on TPU, cuDNN on GPU, XLA on CPU. `set_attention` writes the choice into every
attention module's `attn_impl`; the model files only ever call `layers.attention`.

Packed rows reach the kernels as `Segments` (the segment ids) rather than as a [B, 1, T, T]
mask: the XLA path compares them inside its softmax fusion, splash takes them as its
`SegmentIds`, and cuDNN gets the mask built from them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}
_SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) length is used
_LANES = 128  # splash's lengths must be multiples of the TPU lane width
_QUERY_BLOCK = 128  # causal XLA attention: queries per block (see `xla_attention`)


class Segments(NamedTuple):
  """Segment ids [B, T] of packed rows (1.. per example, 0 = padding), standing for the mask
  `ids[:, None, :, None] == ids[:, None, None, :]` of self-attention over those rows."""

  ids: Array

  def mask(self) -> Array:
    return self.ids[:, None, :, None] == self.ids[:, None, None, :]


def resolve(name: str, platform: str) -> str:
  """'auto' -> the implementation for `platform` ('tpu', 'gpu', 'cpu'); others are checked and kept."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"train.attention must be one of {IMPLEMENTATIONS}, got {name!r}")
  if name != "auto":
    return name
  return _BY_PLATFORM.get(platform, "xla")


def set_attention(model: nnx.Module, llm: str, vit: str | None = None) -> nnx.Module:
  """Sets `attn_impl` of the language model's attention modules to `llm` and the vision tower's to
  `vit` (default: `llm`), in place; 'xla' is stored as None, the models' default."""
  vit = llm if vit is None else vit
  for path, module in nnx.iter_modules(model):
    if hasattr(module, "attn_impl"):
      impl = vit if path and path[0] == "vision" else llm
      module.attn_impl = None if impl == "xla" else impl
  return model


def xla_attention(q: Array, k: Array, v: Array, mask: Array | Segments | None, causal: bool) -> Array:
  """Softmax attention in einsums, any platform: q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H].

  `mask` as `layers.attention` takes it. Causal self-attention (T == S, `Segments` or no mask)
  runs in blocks of `_QUERY_BLOCK` queries, each against the keys up to its last query only: a
  third fewer FLOPs at 512 tokens, and a block's [G x 128, S] scores stay in a CPU core's cache
  through the softmax and its backward where the whole [T, S] did not (on a 2-core Xeon the
  512-token attention of benchmarks/vs_transformers.py: 130 -> 37 ms forward and backward,
  torch's SDPA 30 ms).
  """
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  # Heads-major operands: per (batch, kv head) both matmuls read contiguous [G*T, H], [S, H] and
  # [G*T, S] blocks, so XLA:CPU copies the small q/k/v/out instead of transposing the probabilities.
  qg = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  scale = 1.0 / math.sqrt(h)
  segments = mask if isinstance(mask, Segments) else None
  if causal and t == s and (mask is None or segments is not None):
    outs = []
    for start in range(0, t, _QUERY_BLOCK):
      stop = min(start + _QUERY_BLOCK, t)
      keep = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
      if segments is not None:
        ids = segments.ids
        keep = keep & (ids[:, None, None, start:stop, None] == ids[:, None, None, None, :stop])
      outs.append(_softmax_attention(qg[:, :, :, start:stop], kh[:, :, :stop], vh[:, :, :stop], keep, scale))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  keep = None
  if mask is not None:  # -> broadcastable to [B, K, G, T, S]
    mask = segments.mask() if segments is not None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1:
      keep = mask[:, :, None]
    else:
      keep = jnp.broadcast_to(mask, (mask.shape[0], n, *mask.shape[2:])).reshape(mask.shape[0], kv, n // kv, *mask.shape[2:])
  if causal:
    lower = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    keep = lower if keep is None else keep & lower
  out = _softmax_attention(qg, kh, vh, keep, scale)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(qg: Array, kh: Array, vh: Array, keep: Array | None, scale: float) -> Array:
  """softmax(q k^T * scale, masked by `keep`) v, heads-major: qg [B,K,G,T,H], kh/vh [B,K,S,H].

  The backward is spelled out so that every big operand is read as it lies: JAX's own transpose
  contracts the [G*T, S] score gradient over its rows for dK and dV, and XLA:CPU copied it
  transposed first (as long as the matmul); here dK and dV come out as [H, S], and only those
  small results are transposed. Masked scores get float32's minimum, so fully masked rows (padding)
  stay finite.
  """
  return _attention_fwd(qg, kh, vh, keep, scale)[0]


def _attention_fwd(qg, kh, vh, keep, scale):
  logits = jnp.einsum("bkgth,bksh->bkgts", qg, kh, preferred_element_type=jnp.float32) * scale
  if keep is not None:
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bkgts,bksh->bkgth", probs.astype(vh.dtype), vh), (qg, kh, vh, probs)


def _attention_bwd(scale, residuals, d_out):
  qg, kh, vh, probs = residuals
  d_probs = jnp.einsum("bkgth,bksh->bkgts", d_out, vh, preferred_element_type=jnp.float32)
  d_logits = (probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * scale).astype(qg.dtype)
  d_q = jnp.einsum("bkgts,bksh->bkgth", d_logits, kh)
  d_k = jnp.einsum("bkgth,bkgts->bkhs", qg, d_logits).swapaxes(2, 3)
  d_v = jnp.einsum("bkgth,bkgts->bkhs", d_out, probs.astype(d_out.dtype)).swapaxes(2, 3)
  return d_q, d_k, d_v, None


_softmax_attention.defvjp(_attention_fwd, _attention_bwd)


def _block(length: int) -> int:
  return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def _splash_kernel(length: int, group: int, causal: bool, interpret: bool):
  """One (query-group x length) MQA kernel; its block masks are built in numpy at trace time."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  shape = (length, length)
  mask = sa.MultiHeadMask([sa.CausalMask(shape) if causal else sa.FullMask(shape)] * group)
  b = _block(length)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array, ids: Array, *, causal: bool, interpret: bool) -> Array:
  """Splash on one device's shard: q [B, K, G, T, H], k/v [B, K, T, H], ids [B, T] -> [B, K, G, T, H]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  kernel = _splash_kernel(q.shape[3], q.shape[2], causal, interpret)
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads, one query group each
  per_row = jax.vmap(lambda q, k, v, i: per_head(q, k, v, sa.SegmentIds(i, i)))
  return per_row(q, k, v, ids)


def splash(q: Array, k: Array, v: Array, segments: Segments | None, *, causal: bool,
           interpret: bool = False) -> Array:
  """TPU splash attention (self-attention, GQA). q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H].

  Lengths are padded to a multiple of 128 with segment id 0 (padded queries only see padded
  keys; their outputs are dropped), so the ViT's 1 + 32x32 tokens work too. Under a mesh context
  (`jax.sharding.use_abstract_mesh`, which `training/step.jit_train_step` sets) the kernel runs
  per shard in `shard_map`: rows over data x fsdp, kv heads over tensor where they divide; a
  Pallas kernel cannot be partitioned by XLA itself, which would gather the whole batch. The
  softmax runs in float32 inside the kernel. `interpret` runs it in Pallas' interpreter (CPU tests).
  """
  b, t, n, h = q.shape
  if k.shape[1] != t:
    raise ValueError(f"splash attention is self-attention only: {t} queries, {k.shape[1]} keys")
  kv = k.shape[2]
  ids = jnp.ones((b, t), jnp.int32) if segments is None else segments.ids.astype(jnp.int32)
  pad = (-t) % _LANES
  if pad:
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, ids = widen(q), widen(k), widen(v), widen(ids)
  tp = t + pad
  qg = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).reshape(b, tp, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  local = functools.partial(_splash_local, causal=causal, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
    rows = ("data", "fsdp") if b % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
    heads = "tensor" if kv % mesh.shape["tensor"] == 0 else None
    local = jax.shard_map(local, mesh=mesh, in_specs=(P(rows, heads), P(rows, heads), P(rows, heads), P(rows)),
                          out_specs=P(rows, heads), check_vma=False)
  out = local(qg, kh, vh, ids)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]
