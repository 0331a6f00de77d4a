"""The SFT train step: a pure, jitted function of (train state, global batch).

Loss: cross-entropy summed over the target (assistant) tokens of the whole optimizer step and
divided by their number, so micro-batching, data parallelism and multi-host runs all give the
same loss and gradient as one big batch; the LM head and the loss run in sequence chunks
(`chunked_cross_entropy`) so the [B, T, V] float32 logits never exist at once. Gradients are
taken only w.r.t. the trainable filter (`nnx.DiffState`), accumulated over `grad_accum`
micro-batches with `lax.scan` (one compiled body whatever the accumulation), clipped by global
norm and applied by AdamW with warmup + cosine. The model computes in its `dtype` (bfloat16 for real runs) while the parameters and the
optimizer state stay float32 (`param_dtype`).

The state is `nnx.split((model, optimizer))`; the step is jitted once with explicit in/out
shardings and the state donated, so every step updates the parameters in place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from facellm_jax.models.config import FaceLLMConfig
from facellm_jax.models.language import segment_mask
from facellm_jax.models.lora import LoRAConfig, lora_param_count

Array = jax.Array
Batch = Mapping[str, Array]

# Dense bf16 peak FLOP/s per chip, by substrings of `device_kind` (first match wins).
PEAK_BF16_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),
    ("v4", 275e12),
)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float
  num_steps: int
  warmup_ratio: float = 0.0
  schedule: str = "cosine"
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0


def learning_rate_schedule(c: OptimConfig) -> optax.Schedule:
  """Linear warmup over `warmup_ratio` of the steps, then cosine to zero (or constant)."""
  warmup = int(round(c.warmup_ratio * c.num_steps))
  if c.schedule == "cosine":
    after = optax.cosine_decay_schedule(c.learning_rate, max(c.num_steps - warmup, 1))
  elif c.schedule == "constant":
    after = optax.constant_schedule(c.learning_rate)
  else:
    raise ValueError(f"train.schedule must be 'cosine' or 'constant', got {c.schedule!r}")
  if warmup == 0:
    return after
  ramp = optax.linear_schedule(c.learning_rate / warmup, c.learning_rate, warmup - 1)
  return optax.join_schedules([ramp, after], [warmup])


def make_tx(c: OptimConfig) -> optax.GradientTransformation:
  clip = [optax.clip_by_global_norm(c.max_grad_norm)] if c.max_grad_norm > 0 else []
  return optax.chain(*clip, optax.adamw(learning_rate_schedule(c), weight_decay=c.weight_decay))


def masked_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
  """(sum of -log p(target) over mask, number of masked tokens), in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_cross_entropy(logits_fn: Callable[[Array], Array], hidden: Array, targets: Array, mask: Array,
                          chunk: int) -> tuple[Array, Array]:
  """`masked_cross_entropy(logits_fn(hidden), ...)` without ever holding the [B, T, V] logits.

  The LM head and the loss run over `chunk`-token slices of the sequence in a `lax.scan` whose
  body is rematerialized (`jax.checkpoint`), so forward and backward each hold one [B, chunk, V]
  float32 block; the price is the head's forward matmul once more in the backward. The
  vocabulary of InternVL3 (151,674) makes the full logits 1.2 GB per 2048-token row in float32,
  and the log-softmax and its gradient as much again. `chunk` <= 0 or >= T: one block.
  """
  b, t = targets.shape
  if chunk <= 0 or chunk >= t:
    return masked_cross_entropy(logits_fn(hidden), targets, mask)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:  # the padded tokens are masked out
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
  slices = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(h, tgt, m):
    return masked_cross_entropy(logits_fn(h), tgt, m)[0]

  def body(total, xs):
    return total + one(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (slices(hidden), slices(targets), slices(mask)))
  return total, jnp.sum(mask.astype(jnp.float32))


def embed_rows(model: nnx.Module, input_ids: Array, pixels_per_row: Array) -> Array:
  """Input embeddings [B, T, D] with each row's images merged into that row's own placeholders.

  `FaceLLM.embed` takes the batch's images in reading order and indexes them by a cumulative
  count over the whole batch: a gather across rows that XLA cannot keep sharded, so every chip
  ran the vision tower on the images of the global batch (the TPU buffer assignment held
  [global images, heads, 1025, 1025] scores on each chip). Here the images stay in their rows'
  M slots [B, M, H, W, 3], real ones first as the pipeline fills them, and a row's i-th
  placeholder takes the i-th image token of its own slots: the same embeddings, sharded by row.
  """
  b, m = pixels_per_row.shape[:2]
  text = model.language.embed_tokens(input_ids)
  images = model.encode_images(pixels_per_row.reshape(b * m, *pixels_per_row.shape[2:]))  # [B*M, L, D]
  images = images.reshape(b, m * images.shape[1], images.shape[-1]).astype(text.dtype)
  is_image = input_ids == model.config.image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, images.shape[1] - 1)
  return jnp.where(is_image[..., None], jnp.take_along_axis(images, index[..., None], axis=1), text)


def rows_per_device(rows: int) -> int:
  """Rows of a global batch that one device holds: split over data x fsdp of the mesh being traced under."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
    return rows
  return max(rows // (mesh.shape["data"] * mesh.shape["fsdp"]), 1)


def _micro_loss(model: nnx.Module, mb: Batch, num_targets: Array, loss_chunk: int) -> tuple[Array, Array]:
  # The model's forward up to the final norm (its __call__ adds the LM head, for inference).
  embeds = embed_rows(model, mb["input_ids"], mb["pixel_values"])
  hidden, _ = model.language(embeds, mb["positions"], segment_mask(mb["segment_ids"]))
  per_row = max(loss_chunk // rows_per_device(hidden.shape[0]), 1) if loss_chunk > 0 else 0
  total, _ = chunked_cross_entropy(model.language.logits, hidden, mb["targets"], mb["loss_mask"], per_row)
  return total / num_targets, total


def make_train_step(graphdef: nnx.GraphDef, wrt: nnx.filterlib.Filter, schedule: optax.Schedule, *,
                    loss_chunk: int = 0) -> Callable[[nnx.State, Batch], tuple[nnx.State, dict]]:
  """The pure step `(state, batch) -> (state, metrics)`.

  `batch` holds `grad_accum` stacked micro-batches: every field has a leading [A] axis, and
  `pixel_values` is per row [A, B, M, H, W, 3] (see `embed_rows`). `loss_chunk`:
  tokens per device of each LM-head + loss block (`chunked_cross_entropy`, over
  `loss_chunk / rows per device` tokens of each row; 0 = whole rows at once), so the block's
  [tokens, vocab] float32 buffers stay the same size whatever the batch.
  """

  def step(state: nnx.State, batch: Batch) -> tuple[nnx.State, dict[str, Array]]:
    model, optimizer = nnx.merge(graphdef, state)
    num_targets = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    grad_fn = nnx.grad(_micro_loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
    model_def, model_state = nnx.split(model)
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, wrt))

    def body(carry, mb):
      # The model state rides in the carry (unchanged) so that its Variables are rebuilt at the
      # scan's trace level, where nnx.grad can take them.
      params, grads, loss_sum = carry
      g, total = grad_fn(nnx.merge(model_def, params), mb, num_targets, loss_chunk)
      return (params, jax.tree.map(jnp.add, grads, g), loss_sum + total), None

    init = (model_state, zeros, jnp.zeros((), jnp.float32))
    (_, grads, loss_sum), _ = jax.lax.scan(body, init, batch)
    lr = schedule(optimizer.step[...])
    optimizer.update(model, grads)
    metrics = {
        "loss": loss_sum / num_targets,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": lr,
        "target_tokens": num_targets,
        "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
        # Segments are numbered 1..k within a row, so a row's max is its number of examples.
        "examples": jnp.sum(jnp.max(batch["segment_ids"], axis=-1).astype(jnp.float32)),
    }
    return nnx.state((model, optimizer)), metrics

  return step


def batch_shardings(mesh: jax.sharding.Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  """Rows (axis 1, after the micro-batch axis) split over data x fsdp; the rest replicated."""
  return {k: NamedSharding(mesh, P(None, ("data", "fsdp"))) for k in batch}


def jit_train_step(step: Callable, state_shardings: Any, batch_sharding: Any,
                   mesh: jax.sharding.Mesh) -> Callable:
  """Compiles once: explicit shardings in and out, the state's buffers donated.

  The step is traced under the mesh (`use_abstract_mesh`) so that kernels XLA cannot partition
  itself (splash attention) can run per shard with `shard_map`.
  """

  def step_on_mesh(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(state, batch)

  return jax.jit(step_on_mesh, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def peak_flops(device: jax.Device) -> float | None:
  """The chip's dense bf16 peak, or None when unknown (CPU): then no MFU is reported."""
  kind = getattr(device, "device_kind", "").lower()
  if device.platform == "cpu":
    return None
  for key, flops in PEAK_BF16_FLOPS:
    if key in kind:
      return flops
  return None


def train_flops_per_step(config: FaceLLMConfig, *, rows: float, seq_len: float, images: float,
                         trainable: str = "full", lora: LoRAConfig | None = None) -> float:
  """Model FLOPs of one optimizer step, counted the way MaxText does (the one home of this count).

  Matmuls: 2 FLOPs per weight and token forward; the backward adds 2 for the input gradient
  where a gradient flows and 2 for the weight gradient where the weight trains: 6N for a trained
  layer, 4N for a frozen one a gradient passes through (the LLM under LoRA), 2N for a frozen
  tower with nothing trainable upstream (the ViT unless 'full'; the projector too under LoRA).
  LoRA adapters count 6 per weight and token. Attention: QK^T and AV are 4*T^2*H*d per layer
  forward, halved for causal LLM attention, full in the ViT, x3 where the backward runs. Every
  position and image slot is counted: no discount for padding or rematerialization.
  """
  t, v = config.text, config.vision
  q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
  llm = t.num_hidden_layers * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
  llm += t.hidden_size * t.vocab_size  # LM head (the embedding lookup is no matmul)
  patches = v.num_patches + 1
  vit = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
  vit += v.num_channels * v.patch_size ** 2 * v.hidden_size  # patch embedding
  projector = (v.hidden_size * int(1 / config.downsample_ratio) ** 2 + t.hidden_size) * t.hidden_size
  tokens = rows * seq_len
  llm_attn = 4 * seq_len ** 2 * q * t.num_hidden_layers / 2 * rows
  vit_attn = 4 * patches ** 2 * v.hidden_size * v.num_hidden_layers * images
  if lora is not None:
    adapters = lora_param_count(config, lora)
    return ((4 * llm + 6 * adapters) * tokens + 3 * llm_attn
            + 2 * images * (vit * patches + projector * config.image_seq_length) + vit_attn)
  vit_mult, proj_mult = {"full": (6, 6), "all_but_vision": (2, 6)}[trainable]
  return (6 * llm * tokens + 3 * llm_attn + images * vit_mult * vit * patches + vit_mult // 2 * vit_attn
          + images * proj_mult * projector * config.image_seq_length)


def count_trainable(state: nnx.State) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
