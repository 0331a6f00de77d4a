"""Sharding: the model born sharded on a data x fsdp x tensor mesh computes what the unsharded one does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from facellm_jax import hf
from facellm_jax.models.config import FaceLLMConfig, TextConfig, VisionConfig
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.models.lora import LoRAConfig, merge_lora
from facellm_jax.models.sharding import (ShardingError, assert_sharded, batch_sharding, create_model, make_mesh,
                                         partition_spec, shard_model, state_shardings)
from hf_tiny import IMAGE_TOKEN_ID, random_inputs

CONFIG = FaceLLMConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=56, patch_size=14),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5000.0),
    image_token_id=IMAGE_TOKEN_ID)
MIN_SIZE = 1024  # every weight matrix of the tiny config; no norm or bias vector


@pytest.fixture(scope="module")
def mesh():
  return make_mesh({"data": -1, "fsdp": 2, "tensor": 2})  # 8 fake CPU devices -> data=2


@pytest.fixture(scope="module")
def sharded(mesh):
  return create_model(CONFIG, mesh, seed=0, lora=LoRAConfig(rank=4))


def placed_as(x: jax.Array, mesh, *spec) -> bool:
  """Equivalent placement (a spec may come back from jit without its trailing Nones)."""
  return x.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), x.ndim)


def flat(model) -> dict[str, jax.Array]:
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def test_make_mesh_fills_the_rest_with_auto_axes(mesh):
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
  four = make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
  assert dict(four.shape) == {"data": 2, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize("shape, message", [
    ({"fsdp": 3, "tensor": -1}, "8 devices are not divisible by 3"),
    ({"data": 2, "fsdp": 2}, r"needs 4 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"fsdp": 0, "data": -1}, "sizes must be >= 1"),
    ({"model": 2, "data": -1}, r"unknown axes \['model'\]"),
])
def test_make_mesh_rejects_shapes_that_do_not_fit_the_devices(shape, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(shape)


def test_partition_spec_follows_the_rules_and_drops_axes_that_do_not_divide(mesh):
  assert partition_spec(("vocab", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
  assert partition_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
  assert partition_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)  # 3 kv columns: not split
  assert partition_spec(("norm",), (64,), mesh) == P(None)
  assert partition_spec(("embed", None), (64, 16), mesh) == P("fsdp", None)  # LoRA rank axis
  with pytest.raises(ShardingError, match="no sharding rule for logical axis 'heads'"):
    partition_spec(("embed", "heads"), (64, 64), mesh)


def test_sharded_model_gives_the_unsharded_logits_in_a_jitted_forward(sharded, mesh):
  device0 = jax.devices()[0]
  unsharded = nnx.merge(nnx.graphdef(sharded), jax.device_put(nnx.state(sharded), device0))
  ids, pixels = random_inputs(image_size=56, image_tokens=CONFIG.image_seq_length, offsets=(0, 3, 6, 9), length=12)
  forward = nnx.jit(lambda model, ids, pixels: model(ids, pixels))
  ref = np.asarray(forward(unsharded, jax.device_put(ids, device0), jax.device_put(pixels, device0)))
  out = forward(sharded, jax.device_put(ids, batch_sharding(mesh)), jax.device_put(pixels, batch_sharding(mesh)))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_large_weights_are_actually_sharded(sharded, mesh):
  language = sharded.language
  embed = language.embed.get_value()
  assert placed_as(embed, mesh, "tensor", "fsdp")
  assert {s.data.shape for s in embed.addressable_shards} == {(64, 32)}  # [128, 64] over tensor x fsdp
  q = language.layers[0].attn.q_proj.kernel.get_value()
  assert placed_as(q, mesh, "fsdp", "tensor") and q.sharding.shard_shape(q.shape) == (32, 32)
  down = language.layers[1].mlp.down_proj.kernel.get_value()
  assert placed_as(down, mesh, "tensor", "fsdp") and down.sharding.shard_shape(down.shape) == (48, 32)
  fc1 = sharded.vision.layers[0].fc1.kernel.get_value()
  assert placed_as(fc1, mesh, "fsdp", "tensor") and fc1.sharding.shard_shape(fc1.shape) == (16, 32)
  lora = language.layers[0].attn.k_proj.lora
  assert placed_as(lora.lora_a.get_value(), mesh, "fsdp", None)
  assert placed_as(lora.lora_b.get_value(), mesh, None, "tensor")
  assert placed_as(language.norm.scale.get_value(), mesh)  # replicated by design
  assert_sharded(sharded, mesh, min_size=MIN_SIZE)


def test_abstract_state_shardings_match_the_created_model(sharded, mesh):
  abstract = hf.abstract_model(CONFIG)
  want = {".".join(map(str, p)): s for p, s in nnx.to_flat_state(state_shardings(nnx.state(abstract), mesh))}
  have = flat(sharded)
  assert want and all(have[k].sharding.is_equivalent_to(s, have[k].ndim) for k, s in want.items())


def test_optimizer_moments_are_sharded_like_their_parameters(mesh):
  abstract = nnx.eval_shape(lambda: nnx.Optimizer(FaceLLM(CONFIG, rngs=nnx.Rngs(0)), optax.adam(1e-3), wrt=nnx.Param))
  shardings = {".".join(map(str, p)): s for p, s in nnx.to_flat_state(state_shardings(nnx.state(abstract), mesh))}
  for moment in ("mu", "nu"):
    assert shardings[f"opt_state.0.{moment}.language.embed"].spec == P("tensor", "fsdp")
    assert shardings[f"opt_state.0.{moment}.language.layers.0.mlp.down_proj.kernel"].spec == P("tensor", "fsdp")
  assert shardings["step"].spec == P()


@pytest.fixture(scope="module")
def checkpoint(sharded, tmp_path_factory):
  """The sharded model's base weights (LoRA merged) written as a HF checkpoint."""
  merged = merge_lora(nnx.merge(nnx.graphdef(sharded), jax.device_get(nnx.state(sharded))))
  return hf.save_pretrained(merged, CONFIG, tmp_path_factory.mktemp("hf") / "tiny"), flat(merged)


def test_load_pretrained_with_shardings_lands_parameters_sharded(checkpoint, mesh):
  path, weights = checkpoint
  shardings = state_shardings(nnx.state(hf.abstract_model(CONFIG)), mesh)
  model, _ = hf.load_pretrained(path, shardings=shardings)
  loaded = flat(model)
  assert loaded.keys() == weights.keys()
  for key, x in loaded.items():
    np.testing.assert_array_equal(np.asarray(x), weights[key], err_msg=key)
  assert placed_as(loaded["language.lm_head"], mesh, "fsdp", "tensor")
  assert loaded["language.layers.0.attn.k_proj.kernel"].sharding.shard_shape((64, 32)) == (32, 16)
  assert_sharded(model, mesh, min_size=MIN_SIZE)


def test_shard_model_moves_an_existing_model_onto_the_mesh(checkpoint, mesh):
  model, _ = hf.load_pretrained(checkpoint[0])
  with pytest.raises(ShardingError):
    assert_sharded(model, mesh, min_size=MIN_SIZE)
  shard_model(model, mesh)
  assert placed_as(model.language.embed.get_value(), mesh, "tensor", "fsdp")
  assert_sharded(model, mesh, min_size=MIN_SIZE)


def test_assert_sharded_names_each_replicated_large_weight(sharded, mesh):
  model = nnx.clone(sharded)
  embed = model.language.embed
  embed.set_value(jax.device_put(embed.get_value(), NamedSharding(mesh, P())))
  with pytest.raises(ShardingError) as error:
    assert_sharded(model, mesh, min_size=MIN_SIZE)
  message = str(error.value)
  assert "1 weight(s) of >= 1024 elements are replicated" in message
  assert "language.embed (128, 64) axes=('vocab', 'embed')" in message
  assert "lm_head" not in message
  assert_sharded(model, make_mesh({"data": -1}), min_size=MIN_SIZE)  # pure data parallel: replication is the plan


def test_batch_sharding_splits_the_leading_dim_over_data_and_fsdp(mesh):
  sharding = batch_sharding(mesh)
  assert sharding.spec == P(("data", "fsdp"))
  batch = jax.device_put(jnp.zeros((8, 16), jnp.int32), sharding)
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 16)}
