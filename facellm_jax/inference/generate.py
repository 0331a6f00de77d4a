"""KV-cache generation for FaceLLM: batched left-padded prompts, greedy or nucleus sampling.

A batch costs few device calls: one jit fills a fixed-length cache with the whole prompt
(compiled once per prompt-length bucket), and one jit runs the decode loop as a
`lax.while_loop` that stops when every row has hit an EOS id or the stage's tokens are out; a
batch still going continues in a stage with a 4x longer cache (`Generator`'s `stage`).
The model enters the jits as `nnx.split` state with its graphdef static, so it is never
retraced per token, and every `Generator` over the same model shares the compiled code.

Positions count only valid tokens (as transformers derives them from `attention_mask`), so
left padding does not shift RoPE and a prompt decodes the same alone or in a batch.

On a mesh (the model's params carry `NamedSharding`s, see `inference/load.py`) the prompt rows
split over `data` x `fsdp` (a batch is topped up with dummy rows, done from the start, to a
multiple of their product) and the KV cache [B, S, kv heads, head dim] over rows and `tensor`
on the kv heads; the weights stay where the rules put them, and XLA partitions the rest. The
tokens are the same on any mesh.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from facellm_jax.inference.sampling import Sampling, sample
from facellm_jax.models.config import FaceLLMConfig
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.models.language import LayerCache

Array = jax.Array

# How often each jitted function below has been traced (= compiled); benchmarks and tests
# read it to prove that repeated calls with the same shapes do not recompile.
TRACES: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a batch lives on the model's mesh (a jit static argument, hence frozen and hashable)."""
  rows: NamedSharding  # [B, ...] over data x fsdp
  cache: NamedSharding  # [B, S, K, H]: rows over data x fsdp, kv heads over tensor

  @property
  def row_multiple(self) -> int:
    mesh = self.rows.mesh
    return mesh.shape["data"] * mesh.shape["fsdp"]

  @classmethod
  def of(cls, config: FaceLLMConfig, state: nnx.State) -> Layout | None:
    """The layout of the mesh a model's `state` (arrays or ShapeDtypeStructs) sits on; None on one device."""
    for leaf in jax.tree.leaves(state):
      if isinstance(getattr(leaf, "sharding", None), NamedSharding):
        mesh = leaf.sharding.mesh
        if mesh.size == 1:
          return None
        kv = config.text.num_key_value_heads
        heads = "tensor" if kv % mesh.shape["tensor"] == 0 else None
        rows = ("data", "fsdp")
        return cls(NamedSharding(mesh, P(rows)), NamedSharding(mesh, P(rows, None, heads, None)))
    return None


def _constrain(cache, layout: Layout | None):
  if layout is None:
    return cache
  return [LayerCache(*(jax.lax.with_sharding_constraint(x, layout.cache) for x in c)) for c in cache]


@dataclasses.dataclass(frozen=True)
class _Decoding:
  """Everything static about the decode loop (a jit static argument, hence frozen)."""
  max_new_tokens: int
  eos_ids: tuple[int, ...]
  pad_id: int
  sampling: Sampling


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "layout"))
def _prefill(graphdef, state, ids, mask, pixel_values, *, cache_len, layout: Layout | None = None):
  """Writes the prompt into slots [0, P) of a fresh cache; returns the last-token logits."""
  TRACES["prefill"] += 1
  model = nnx.merge(graphdef, state)
  b, p = ids.shape
  positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
  # Slots past the prompt are marked valid up front: the causal mask hides them until written.
  key_valid = jnp.concatenate([mask, jnp.ones((b, cache_len - p), bool)], axis=1)
  cache = _constrain(model.language.init_cache(b, cache_len), layout)
  logits, cache = model.decode_step(ids, pixel_values, positions, key_valid, cache, jnp.int32(0))
  return logits[:, 0], _constrain(cache, layout), key_valid


def _pick(logits, key, step, done, d: _Decoding):
  """Token `step` for every row: finished rows emit pad; a row finishes on any EOS id."""
  token = sample(logits, jax.random.fold_in(key, step), d.sampling)
  token = jnp.where(done, d.pad_id, token)
  return token, done | jnp.isin(token, jnp.asarray(d.eos_ids, jnp.int32))


@functools.partial(jax.jit, static_argnames=("d",))
def _start(logits, live, key, *, d: _Decoding):
  """The decode loop's first carry: token 0 from the prefill logits (pad where not `live`)."""
  token, done = _pick(logits, key, 0, ~live, d)
  out = jnp.full((logits.shape[0], d.max_new_tokens), d.pad_id, jnp.int32).at[:, 0].set(token)
  return jnp.int32(1), token, done, out


@functools.partial(jax.jit, static_argnames=("graphdef", "d", "layout"), donate_argnames=("cache", "out"))
def _decode(graphdef, state, step, token, cache, done, out, key_valid, start, lengths, key, stop, *, d: _Decoding,
            layout: Layout | None = None):
  """Decode steps `step`..`stop - 1` (fewer once every row is done): fills `out` [B, max_new_tokens],
  pad after each row's EOS. Returns the carry for the next stage."""
  TRACES["decode"] += 1
  model = nnx.merge(graphdef, state)

  def cond(carry):
    step, _, _, done, _ = carry
    return (step < stop) & ~jnp.all(done)

  def body(carry):
    step, token, cache, done, out = carry
    # Token step-1 goes into slot start+step-1 at RoPE position lengths+step-1.
    logits, cache = model.decode_step(token[:, None], None, (lengths + step - 1)[:, None], key_valid, cache,
                                      start + step - 1)
    token, done = _pick(logits[:, 0], key, step, done, d)
    return step + 1, token, _constrain(cache, layout), done, out.at[:, step].set(token)

  return jax.lax.while_loop(cond, body, (step, token, cache, done, out))


@functools.partial(jax.jit, static_argnames=("length", "layout"))
def _grow(cache, key_valid, *, length: int, layout: Layout | None = None):
  """The cache and its validity widened to `length` slots (new slots: zeros, hidden until written)."""
  pad = length - key_valid.shape[1]
  widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
  cache = [LayerCache(widen(c.k), widen(c.v)) for c in cache]
  return _constrain(cache, layout), jnp.pad(key_valid, ((0, 0), (0, pad)), constant_values=True)


@functools.partial(jax.jit, static_argnames="sampling")
def _first(logits, key, *, sampling: Sampling):
  return sample(logits, jax.random.fold_in(key, 0), sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "layout"), donate_argnames="cache")
def _step(graphdef, state, token, cache, key_valid, index, position, key, step, *, sampling: Sampling,
          layout: Layout | None = None):
  """One streaming step: feed `token` into slot `index`, sample token number `step`."""
  TRACES["step"] += 1
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode_step(token[:, None], None, position[:, None], key_valid, cache, index)
  return sample(logits[:, 0], jax.random.fold_in(key, step), sampling), _constrain(cache, layout)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Generator:
  """Generation with fixed settings, for repeated calls (evaluation, chat).

  Calls whose shapes match an earlier call (batch size, prompt bucket, cache length, images
  or not) with the same settings reuse the compiled code. The model's current weights are
  read at every call, so training between calls is fine.

  Output per row: the new tokens up to, and excluding, the first EOS id. Sampling draws row r
  of step i with `fold_in(fold_in(PRNGKey(seed), i), r)`.

  Short answers (a multiple-choice letter) are the common case, so the cache starts with room
  for `stage` new tokens only and the decode loop runs in stages that each grow the cache 4x
  (up to `max_new_tokens`); a batch whose rows all stopped never pays for the long cache.
  `stage=None` sizes the cache for `max_new_tokens` from the start (one stage). An explicit
  `cache_len` fixes the cache length instead.
  """

  def __init__(self, model: FaceLLM, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int = 0,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, cache_len: int | None = None,
               bucket: int = 64, stage: int | None = 32):
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not eos_ids:
      raise ValueError("eos_ids is empty: generation needs at least one stop token (e.g. <|im_end|>)")
    if cache_len is not None and cache_len < max_new_tokens:
      raise ValueError(f"cache_len {cache_len} cannot hold even max_new_tokens={max_new_tokens}")
    if stage is not None and stage < 1:
      raise ValueError(f"stage must be >= 1 (or None), got {stage}")
    self.model, self.cache_len, self.bucket = model, cache_len, bucket
    self.stage = max_new_tokens if stage is None else min(stage, max_new_tokens)
    self.decoding = _Decoding(max_new_tokens, tuple(int(e) for e in eos_ids), pad_id,
                              Sampling(temperature, top_p, top_k))

  def _cache_len(self, p: int, new_tokens: int) -> int:
    """Cache slots for a P-token prompt and `new_tokens` new ones (the last is never fed back)."""
    return self.cache_len or _round_up(p + new_tokens - 1, self.bucket)

  def _prepare(self, prompts: Sequence[Sequence[int]], pixel_values, rows: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Left-pads prompts into [rows, P] ids + validity mask (P bucketed to bound recompiles); rows
    past the prompts are dummies of one pad token. Images are topped up with zero images (never
    looked up) to a multiple of `rows`, so their count too takes few values and splits over data."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError(f"every prompt needs at least one token; got lengths {[len(p) for p in prompts]}")
    longest, n = max(len(p) for p in prompts), self.decoding.max_new_tokens
    p = _round_up(longest, self.bucket)
    if self.cache_len is not None:
      if longest + n - 1 > self.cache_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={n} does not fit cache_len={self.cache_len}")
      p = min(p, self.cache_len - n + 1)
    ids = np.full((rows, p), self.decoding.pad_id, np.int32)
    mask = np.zeros((rows, p), bool)
    mask[len(prompts):, -1] = True
    for row, prompt in enumerate(prompts):
      ids[row, p - len(prompt):] = prompt
      mask[row, p - len(prompt):] = True
    config = self.model.config
    placeholders = int((ids == config.image_token_id).sum())
    images = 0 if pixel_values is None else pixel_values.shape[0]
    if placeholders != images * config.image_seq_length:
      raise ValueError(f"prompts hold {placeholders} image placeholders (token {config.image_token_id}) but "
                       f"{images} image(s) need {images * config.image_seq_length} "
                       f"({config.image_seq_length} each)")
    if images % rows:
      pixel_values = np.concatenate([pixel_values, np.zeros((rows - images % rows, *pixel_values.shape[1:]),
                                                            pixel_values.dtype)])
    return ids, mask, pixel_values

  def _prefill(self, prompts, pixel_values, new_tokens: int, batch: int | None = None):
    graphdef, state = nnx.split(self.model)
    layout = Layout.of(self.model.config, state)
    multiple = 1 if layout is None else layout.row_multiple
    rows = _round_up(max(len(prompts), batch or 0), multiple)
    if pixel_values is not None:
      pixel_values = np.asarray(pixel_values, np.float32)
    ids, mask, pixel_values = self._prepare(prompts, pixel_values, rows)
    lengths = mask.sum(axis=1).astype(np.int32)
    live = np.arange(rows) < len(prompts)
    if layout is not None:
      ids, mask, live = jax.device_put((ids, mask, live), layout.rows)
      if pixel_values is not None:
        pixel_values = jax.device_put(pixel_values, layout.rows)
    logits, cache, key_valid = _prefill(graphdef, state, ids, mask, pixel_values,
                                        cache_len=self._cache_len(ids.shape[1], new_tokens), layout=layout)
    return graphdef, state, logits, cache, key_valid, ids.shape[1], lengths, live, layout

  def __call__(self, prompts: Sequence[Sequence[int]], pixel_values: Array | np.ndarray | None = None, *,
               seed: int = 0, batch: int | None = None) -> list[list[int]]:
    """New tokens per prompt, EOS excluded. pixel_values [N, H, W, 3]: images in prompt order, row-major.

    `batch` tops a shorter call up with dummy rows to that many, so calls share compiled code.
    """
    d, key, stop = self.decoding, jax.random.key(seed), self.stage
    graphdef, state, logits, cache, key_valid, start, lengths, live, layout = self._prefill(
        prompts, pixel_values, stop, batch)
    step, token, done, out = _start(logits, live, key, d=d)
    while True:
      step, token, cache, done, out = _decode(graphdef, state, step, token, cache, done, out, key_valid, start,
                                              lengths, key, stop, d=d, layout=layout)
      if stop >= d.max_new_tokens or bool(jnp.all(done)):
        break
      stop = min(4 * stop, d.max_new_tokens)
      length = self._cache_len(start, stop)
      if length > key_valid.shape[1]:
        cache, key_valid = _grow(cache, key_valid, length=length, layout=layout)
    eos = set(d.eos_ids)
    result = []
    for row in np.asarray(out)[:len(prompts)].tolist():
      stop = next((i for i, t in enumerate(row) if t in eos), len(row))
      result.append(row[:stop])
    return result

  def stream(self, prompt: Sequence[int], pixel_values: Array | np.ndarray | None = None, *,
             seed: int = 0) -> Iterator[int]:
    """Yields the new tokens of one prompt as they come (EOS excluded); same tokens as `self([prompt])`."""
    d, key = self.decoding, jax.random.key(seed)
    graphdef, state, logits, cache, key_valid, start, lengths, _, layout = self._prefill(
        [prompt], pixel_values, d.max_new_tokens)
    token = _first(logits, key, sampling=d.sampling)
    for step in range(1, d.max_new_tokens + 1):
      value = int(token[0])
      if value in d.eos_ids:
        return
      yield value
      if step == d.max_new_tokens:
        return
      token, cache = _step(graphdef, state, token, cache, key_valid, start + step - 1, lengths + step - 1, key,
                           step, sampling=d.sampling, layout=layout)


def generate(model: FaceLLM, prompts: Sequence[Sequence[int]], pixel_values: Array | np.ndarray | None = None, *,
             max_new_tokens: int, eos_ids: Sequence[int], pad_id: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, cache_len: int | None = None) -> list[list[int]]:
  """Batched generation: new tokens per prompt, EOS excluded (see `Generator`)."""
  return Generator(model, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, temperature=temperature,
                   top_p=top_p, top_k=top_k, cache_len=cache_len)(prompts, pixel_values, seed=seed)


def stream(model: FaceLLM, prompt: Sequence[int], pixel_values: Array | np.ndarray | None = None, *,
           max_new_tokens: int, eos_ids: Sequence[int], pad_id: int = 0, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int = 0, cache_len: int | None = None) -> Iterator[int]:
  """One prompt, tokens yielded one by one (for the chat CLI); EOS excluded."""
  return Generator(model, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, temperature=temperature,
                   top_p=top_p, top_k=top_k, cache_len=cache_len).stream(prompt, pixel_values, seed=seed)
