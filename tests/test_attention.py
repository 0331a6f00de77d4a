"""The attention door: XLA attention equals plain softmax attention, splash (in Pallas' interpreter)
equals XLA attention; the config's choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facellm_jax.models import attention as attention_lib
from facellm_jax.models import layers
from facellm_jax.models import sharding
from facellm_jax.models.facellm import FaceLLM
from test_train_step import CONFIG


def _qkv(b, t, n, kv, h, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, t, kv, h)),
          jax.random.normal(ks[2], (b, t, kv, h)))


def _packed_ids(b, t):
  """Row 0: segments of 100, 60 and padding; row 1: one sequence."""
  ids = np.zeros((b, t), np.int32)
  ids[0, :100], ids[0, 100:160] = 1, 2
  ids[1:] = 1
  return jnp.asarray(ids)


def _plain(q, k, v, keep):
  """The textbook form, JAX's own gradient: softmax(q k^T / sqrt(h) where keep) v, GQA by repeat."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("case", ["causal_packed_blocks", "causal_one_block", "bidirectional", "cache_mask"])
def test_xla_attention_and_its_gradient_equal_plain_softmax_attention(case):
  t = {"causal_packed_blocks": 300, "causal_one_block": 96}.get(case, 40)  # 300: blocks 128+128+44
  q, k, v = _qkv(2, t, 4, 2, 16, seed=1)
  ids = _packed_ids(2, t) if case == "causal_packed_blocks" else jnp.ones((2, t), jnp.int32)
  causal = case.startswith("causal")
  lower = jnp.tril(jnp.ones((t, t), bool))
  if case == "cache_mask":  # decoding: the last 8 queries against all keys, an explicit mask
    q = q[:, -8:]
    mask = jnp.asarray(np.random.default_rng(0).random((2, 1, 8, t)) < 0.7).at[..., 0].set(True)
    ours = lambda q, k, v: layers.attention(q, k, v, mask, "xla")
    plain = lambda q, k, v: _plain(q, k, v, mask)
  else:
    mask = attention_lib.Segments(ids) if causal else None
    keep = (ids[:, None, :, None] == ids[:, None, None, :]) & (lower if causal else True)
    ours = lambda q, k, v: layers.attention(q, k, v, mask, "xla", causal=causal)
    plain = lambda q, k, v: _plain(q, k, v, keep)
  np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(2), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [256, 180])  # 180: padded to 256 inside
def test_splash_equals_xla_causal_packed_gqa(t):
  q, k, v = _qkv(2, t, 4, 2, 16)
  segments = attention_lib.Segments(_packed_ids(2, t))
  want = layers.attention(q, k, v, segments, "xla", causal=True)
  got = layers.attention(q, k, v, segments, "splash_interpret", causal=True)
  real = np.asarray(segments.ids) > 0  # padding positions' outputs are never used
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5)


def test_splash_equals_xla_bidirectional_vit_length():
  q, k, v = _qkv(2, 1 + 6 * 6, 4, 4, 16, seed=1)  # 37 tokens, like the ViT's 1 + 32 x 32
  want = layers.attention(q, k, v, None, "xla")
  got = layers.attention(q, k, v, None, "splash_interpret")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_splash_gradients_equal_xla():
  q, k, v = _qkv(2, 128, 4, 2, 16, seed=2)
  segments = attention_lib.Segments(_packed_ids(2, 128))
  real = (segments.ids > 0)[..., None, None]

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.where(real, layers.attention(q, k, v, segments, impl, causal=True), 0) ** 2)

  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss("splash_interpret"), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_splash_under_a_mesh_runs_per_shard_and_equals_xla():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  q, k, v = _qkv(4, 128, 4, 2, 16, seed=3)
  segments = attention_lib.Segments(jnp.concatenate([_packed_ids(2, 128)] * 2))
  want = layers.attention(q, k, v, segments, "xla", causal=True)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  def f(q, k, v, ids):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as step.jit_train_step traces the step
      return layers.attention(q, k, v, attention_lib.Segments(ids), "splash_interpret", causal=True)

  got = jax.jit(f, in_shardings=rows, out_shardings=rows)(q, k, v, segments.ids)
  real = np.asarray(segments.ids) > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5)


def test_model_logits_are_the_same_with_splash():
  model = FaceLLM(CONFIG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(10, 64, (2, 20)), jnp.int32).at[:, 1:5].set(5)
  pixels = jnp.asarray(rng.normal(size=(2, 56, 56, 3)), jnp.float32)
  segment_ids = jnp.asarray([[1] * 12 + [2] * 6 + [0] * 2, [1] * 20], jnp.int32)
  forward = nnx.jit(lambda m, ids, pixels, segment_ids: m(ids, pixels, segment_ids=segment_ids))
  want = forward(model, ids, pixels, segment_ids)
  attention_lib.set_attention(model, "splash_interpret")
  got = forward(model, ids, pixels, segment_ids)
  keep = np.asarray(segment_ids) > 0
  np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], rtol=1e-4, atol=1e-4)


def test_auto_picks_by_platform_and_bad_names_fail():
  assert [attention_lib.resolve("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "xla"]
  assert attention_lib.resolve("xla", "tpu") == "xla"
  with pytest.raises(ValueError, match="train.attention"):
    attention_lib.resolve("flash", "tpu")


def test_set_attention_sets_llm_and_vit_separately():
  model = nnx.eval_shape(lambda: FaceLLM(CONFIG, rngs=nnx.Rngs(0)))
  attention_lib.set_attention(model, "splash", vit="xla")
  impls = {(p[0], m.attn_impl) for p, m in nnx.iter_modules(model) if hasattr(m, "attn_impl")}
  assert impls == {("language", "splash"), ("vision", None)}
