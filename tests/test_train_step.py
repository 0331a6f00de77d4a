"""The pure train step: loss normalization, gradient accumulation, image order, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facellm_jax.models import config as config_lib
from facellm_jax.models import lora as lora_lib
from facellm_jax.models import sharding
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.training import step as step_lib

CONFIG = config_lib.FaceLLMConfig(
    vision=config_lib.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, image_size=56, patch_size=14),
    text=config_lib.TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    image_token_id=5)


def test_masked_cross_entropy_sums_only_masked_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 3))
  mask = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  total, count = step_lib.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -sum(logp[b, t, targets[b, t]] for b, t in zip(*np.nonzero(mask)))
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  assert float(count) == 3


def test_embed_rows_equals_the_models_reading_order_merge():
  """Rows with 1, 2 and 0 images in 2 slots each: per-row merging gives FaceLLM.embed's embeddings."""
  model = FaceLLM(CONFIG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(10, 64, (3, 14)).astype(np.int32)
  ids[0, 1:5] = 5
  ids[1, 1:5] = ids[1, 8:12] = 5  # two images in row 1
  pixels = rng.normal(size=(3, 2, 56, 56, 3)).astype(np.float32)
  pixels[0, 1] = pixels[2] = 0.0  # empty slots
  reading_order = np.concatenate([pixels[0, :1], pixels[1, :2]])
  want = model.embed(jnp.asarray(ids), jnp.asarray(reading_order))
  got = step_lib.embed_rows(model, jnp.asarray(ids), jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_warmup_then_cosine_schedule():
  sched = step_lib.learning_rate_schedule(step_lib.OptimConfig(learning_rate=1.0, num_steps=10, warmup_ratio=0.2))
  np.testing.assert_allclose([float(sched(s)) for s in (0, 1, 2, 10)], [0.5, 1.0, 1.0, 0.0], atol=1e-6)


def _batch(accum: int, rows: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  t = 12
  ids = rng.integers(10, 64, (accum * rows, t)).astype(np.int32)
  ids[:, 1:5] = 5  # one image: 4 placeholders
  mask = (rng.random((accum * rows, t)) < 0.4).astype(np.float32)
  mask[0] = 0.0  # rows with different numbers of targets: the normalization must be global.
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask,
           "positions": np.tile(np.arange(t, dtype=np.int32), (accum * rows, 1)),
           "segment_ids": np.ones((accum * rows, t), np.int32), "num_images": np.ones(accum * rows, np.int32),
           "pixel_values": rng.normal(size=(accum * rows, 1, 56, 56, 3)).astype(np.float32)}
  return {k: v.reshape(accum, rows, *v.shape[1:]) for k, v in batch.items()}


def _run(accum: int, rows: int, trainable: str):
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  lora = lora_lib.LoRAConfig(rank=2) if trainable == "lora" else None
  model = sharding.create_model(CONFIG, mesh, seed=0, lora=lora)
  wrt = lora_lib.trainable_filter(trainable)
  oc = step_lib.OptimConfig(learning_rate=1e-2, num_steps=4)
  optimizer = nnx.Optimizer(model, step_lib.make_tx(oc), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  frozen = nnx.state(model, nnx.Not(wrt))
  step = jax.jit(step_lib.make_train_step(graphdef, wrt, step_lib.learning_rate_schedule(oc)))
  metrics = []
  for i in range(1):
    state, m = step(state, _batch(accum, rows, seed=i))
    metrics.append(m)
  model, _ = nnx.merge(graphdef, state)
  return metrics, nnx.state(model, wrt), frozen, nnx.state(model, nnx.Not(wrt))


def test_grad_accumulation_equals_one_big_batch():
  big, big_params, _, _ = _run(1, 4, "full")
  acc, acc_params, _, _ = _run(2, 2, "full")
  for a, b in zip(acc, big):
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-4)
  for x, y in zip(jax.tree.leaves(acc_params), jax.tree.leaves(big_params)):
    # Adam's update is ~lr per element whatever the gradient's size: compare on that scale.
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-4)


def test_lora_step_updates_only_adapters():
  metrics, params, frozen_before, frozen_after = _run(1, 2, "lora")
  assert np.isfinite(float(metrics[0]["loss"]))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)))
  assert any(np.abs(np.asarray(x)).sum() > 0 for path, x in jax.tree_util.tree_leaves_with_path(params)
             if "lora_b" in jax.tree_util.keystr(path))


def _loss_and_grads(loss_chunk: int):
  """Loss sum and gradients of every parameter (LM head included) of one float32 micro-batch."""
  model = FaceLLM(CONFIG, rngs=nnx.Rngs(0))
  mb = jax.tree.map(lambda x: jnp.asarray(x[0]), _batch(1, 3, seed=1))
  grad_fn = nnx.grad(step_lib._micro_loss, has_aux=True)  # pylint: disable=protected-access
  grads, total = nnx.jit(lambda m, mb: grad_fn(m, mb, jnp.float32(7.0), loss_chunk))(model, mb)
  return float(total), grads


@pytest.mark.parametrize("chunk", [15, 12])  # per device; 3 rows of 12 tokens: blocks of 5 (one padded) and 4 per row
def test_chunked_loss_gives_the_same_loss_and_gradients(chunk):
  whole, whole_grads = _loss_and_grads(0)
  chunked, chunked_grads = _loss_and_grads(chunk)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(chunked_grads), jax.tree.leaves(whole_grads)):
    scale = float(np.abs(np.asarray(w)).max()) + 1e-30
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_chunked_cross_entropy_equals_the_plain_one_on_random_logits():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 30, (2, 10)))
  mask = jnp.asarray(rng.random((2, 10)) < 0.5, jnp.float32)
  plain = step_lib.masked_cross_entropy(hidden @ w, targets, mask)
  chunked = step_lib.chunked_cross_entropy(lambda h: h @ w, hidden, targets, mask, 3)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), rtol=1e-6)
