"""LoRA: adapters are a no-op at init, merge exactly, and are the only thing that trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from facellm_jax.models.config import FaceLLMConfig, TextConfig, VisionConfig
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.models.layers import Linear
from facellm_jax.models.lora import (LoRAAdapter, LoRAConfig, apply_lora, count_params, lora_param_count, lora_state,
                                     merge_lora, trainable_filter)
from hf_tiny import IMAGE_TOKEN_ID, random_inputs, rel_err

TINY_VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14)
CONFIG = FaceLLMConfig(
    vision=TINY_VISION,
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5000.0),
    image_token_id=IMAGE_TOKEN_ID)
EVERYWHERE = LoRAConfig(rank=4, alpha=8.0, modules=("language", "vision", "projector"),
                        targets=LoRAConfig().targets + ("out_proj", "fc1", "fc2", "linear_1", "linear_2"))
LANGUAGE_PROJECTIONS = {("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
                        ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")}


@nnx.jit
def forward(model, ids, pixels):
  return model(ids, pixels)


@pytest.fixture(scope="module")
def base():
  return nnx.jit(lambda: FaceLLM(CONFIG, rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def inputs():
  ids, pixels = random_inputs(image_size=56, image_tokens=CONFIG.image_seq_length, length=12)
  return jnp.asarray(ids), jnp.asarray(pixels)


def adapter_paths(model) -> list[tuple]:
  return [path for path, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora is not None]


def randomize_lora(model, seed: int = 1) -> None:
  """Small nonzero B, as after some training: adapters now shift the output and every LoRA grad is nonzero."""
  adapters = [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRAAdapter)]
  keys = jax.random.split(jax.random.key(seed), len(adapters))
  for key, adapter in zip(keys, adapters):
    adapter.lora_b.set_value(0.05 * jax.random.normal(key, adapter.lora_b.shape))


def test_fresh_adapters_leave_logits_exactly_unchanged(base, inputs):
  model = apply_lora(nnx.clone(base), EVERYWHERE, nnx.Rngs(1))
  for path in adapter_paths(model):
    adapter = model
    for key in path:
      adapter = adapter[key] if isinstance(key, int) else getattr(adapter, key)
    assert np.all(np.asarray(adapter.lora.lora_b[...]) == 0)
    assert np.any(np.asarray(adapter.lora.lora_a[...]) != 0)
  np.testing.assert_array_equal(forward(model, *inputs), forward(base, *inputs))


def test_merge_gives_the_unmerged_logits_and_the_base_parameter_tree(base, inputs):
  model = apply_lora(nnx.clone(base), EVERYWHERE, nnx.Rngs(1))
  randomize_lora(model)
  unmerged = forward(model, *inputs)
  assert rel_err(unmerged, forward(base, *inputs)) > 1e-2  # the adapters matter
  merged = merge_lora(model)
  assert adapter_paths(merged) == [] and count_params(merged, nnx.LoRAParam) == 0
  assert nnx.graphdef(merged) == nnx.graphdef(base)
  np.testing.assert_allclose(forward(merged, *inputs), unmerged, rtol=1e-5,
                             atol=1e-5 * float(np.abs(unmerged).max()))


def test_default_targets_are_the_seven_projections_of_every_language_layer(base):
  model = apply_lora(nnx.clone(base), LoRAConfig(), nnx.Rngs(1))
  paths = adapter_paths(model)
  assert len(paths) == 7 * CONFIG.text.num_hidden_layers
  expected = {("language", "layers", i, *p) for i in range(CONFIG.text.num_hidden_layers)
              for p in LANGUAGE_PROJECTIONS}
  assert set(paths) == expected
  assert count_params(model.vision, nnx.LoRAParam) == 0 and count_params(model.projector, nnx.LoRAParam) == 0


def test_vision_and_projector_adapters_only_when_asked(base):
  model = apply_lora(nnx.clone(base), EVERYWHERE, nnx.Rngs(1))
  vision = [p for p, m in nnx.iter_modules(model.vision) if isinstance(m, Linear) and m.lora]
  projector = [p for p, m in nnx.iter_modules(model.projector) if isinstance(m, Linear) and m.lora]
  assert len(vision) == 6 * CONFIG.vision.num_hidden_layers  # q, k, v, out_proj, fc1, fc2
  assert sorted(projector) == [("linear_1",), ("linear_2",)]


def test_adapters_carry_the_logical_axes_of_their_kernel(base):
  model = apply_lora(nnx.clone(base), LoRAConfig(rank=4), nnx.Rngs(1))
  k_proj = model.language.layers[0].attn.k_proj
  assert isinstance(k_proj.lora, LoRAAdapter)
  assert k_proj.lora.lora_a.get_metadata()["axes"] == ("embed", None)
  assert k_proj.lora.lora_b.get_metadata()["axes"] == (None, "kv_heads")
  assert k_proj.lora.lora_a.shape == (64, 4) and k_proj.lora.lora_b.shape == (4, 32)
  down = model.language.layers[1].mlp.down_proj.lora
  assert down.lora_a.get_metadata()["axes"] == ("mlp", None) and down.lora_b.get_metadata()["axes"] == (None, "embed")
  bound = 1 / np.sqrt(64)  # peft's kaiming-uniform(a=sqrt(5)) bound, 1/sqrt(fan_in)
  a = np.asarray(k_proj.lora.lora_a[...])
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound


def test_param_count_is_rank_times_in_plus_out_per_target(base):
  r = 4
  model = apply_lora(nnx.clone(base), LoRAConfig(rank=r), nnx.Rngs(1))
  # q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->96, down 96->64; two layers.
  by_hand = 2 * r * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 96) + (96 + 64))
  assert count_params(model, nnx.LoRAParam) == lora_param_count(CONFIG, LoRAConfig(rank=r)) == by_hand == 7424
  everywhere = apply_lora(nnx.clone(base), EVERYWHERE, nnx.Rngs(1))
  assert count_params(everywhere, nnx.LoRAParam) == lora_param_count(CONFIG, EVERYWHERE)


def test_paper_config_on_the_1b_language_model_trains_8_8m_parameters():
  config = FaceLLMConfig(vision=TINY_VISION)  # InternVL3-1B's Qwen2 decoder (the TextConfig defaults)
  model = nnx.eval_shape(lambda: apply_lora(FaceLLM(config, rngs=nnx.Rngs(0)), LoRAConfig(), nnx.Rngs(1)))
  # 24 layers x r=16 x (q 896+896, k/v 896+128, o 896+896, gate/up/down 896+4864).
  expected = 24 * 16 * (2 * (896 + 896) + 2 * (896 + 128) + 3 * (896 + 4864))
  assert count_params(model, nnx.LoRAParam) == lora_param_count(config, LoRAConfig()) == expected == 8_798_208


def lm_loss(model, ids):
  logits = model(ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.fixture(scope="module")
def lora_step(base, inputs):
  """One jitted AdamW step on a LoRA model, built as a LoRA training run builds it.

  Returns (model, grads, parameters before, parameters after); one compile serves two tests.
  """
  model = apply_lora(nnx.clone(base), LoRAConfig(rank=4), nnx.Rngs(1))
  randomize_lora(model)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=trainable_filter("lora"))

  @nnx.jit
  def step(model, optimizer, ids):
    grad_fn = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, trainable_filter("lora")))
    _, grads = grad_fn(model, ids)
    optimizer.update(model, grads)
    return grads

  snapshot = lambda: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
  before = snapshot()
  grads = step(model, optimizer, inputs[0])
  return model, grads, before, snapshot()


def test_gradients_wrt_the_lora_filter_touch_only_adapters(lora_step):
  model, grads, _, _ = lora_step
  flat = nnx.to_flat_state(grads)
  assert all(isinstance(v, nnx.LoRAParam) for _, v in flat)
  assert {p for p, _ in flat} == {p for p, _ in nnx.to_flat_state(lora_state(model))}
  assert all(float(jnp.abs(v[...]).max()) > 0 for _, v in flat)


def test_optimizer_step_changes_only_lora_params(lora_step):
  model, _, before, after = lora_step
  lora_paths = {p for p, _ in nnx.to_flat_state(lora_state(model))}
  assert len(lora_paths) == 2 * 7 * CONFIG.text.num_hidden_layers
  assert before.keys() == after.keys()
  for path in before:
    changed = not np.array_equal(before[path], after[path])
    assert changed == (path in lora_paths), path


def test_trainable_filters_select_the_documented_parameters(base):
  model = apply_lora(nnx.clone(base), LoRAConfig(rank=4), nnx.Rngs(1))
  all_params = count_params(model, nnx.Param)
  assert count_params(model, trainable_filter("full")) == all_params
  assert count_params(model, trainable_filter("lora")) == lora_param_count(CONFIG, LoRAConfig(rank=4))
  paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter("all_but_vision")))]
  assert {p[0] for p in paths} == {"language", "projector"}
  assert count_params(model, trainable_filter("all_but_vision")) == all_params - count_params(model.vision)
  with pytest.raises(ValueError, match="unknown trainable kind 'bias'"):
    trainable_filter("bias")


def test_bad_lora_configs_fail_with_the_reason(base):
  with pytest.raises(ValueError, match=r"\['fc3'\] match no Linear"):
    apply_lora(nnx.clone(base), LoRAConfig(targets=("q_proj", "fc3")), nnx.Rngs(1))
  with pytest.raises(ValueError, match="subset of"):
    LoRAConfig(modules=("decoder",))
  with pytest.raises(ValueError, match="rank must be >= 1"):
    LoRAConfig(rank=0)
  model = apply_lora(nnx.clone(base), LoRAConfig(rank=2), nnx.Rngs(1))
  with pytest.raises(ValueError, match="already has a LoRA adapter"):
    apply_lora(model, LoRAConfig(rank=2), nnx.Rngs(1))
