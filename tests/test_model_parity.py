"""Our InternVL equals transformers' logit for logit, in and out of HF checkpoints."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from facellm_jax import hf
from facellm_jax.models.config import from_hf_dict, to_hf_dict
from hf_tiny import hf_logits, make_hf_model, random_inputs, rel_err

CONFIGS = {
    "qwen2-layernorm-untied": dict(),
    "qwen3-rmsnorm-qknorm-tied-kv1-84px-layer-2": dict(text_type="qwen3", norm="rms_norm", qk_norm=True, tie=True,
                                                       kv_heads=1, image_size=84, feature_layer=-2),
    "qwen2-rmsnorm-tied-mha": dict(norm="rms_norm", tie=True, kv_heads=4, feature_layer=1),
    "qwen3-layernorm-qknorm-untied-112px": dict(text_type="qwen3", qk_norm=True, image_size=112),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
  torch_model = make_hf_model(**CONFIGS[request.param])
  path = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(path)
  model, config = hf.load_pretrained(path)
  return torch_model, model, config, path


def test_logits_match_transformers(checkpoint):
  torch_model, model, config, _ = checkpoint
  ids, pixels = random_inputs(config.vision.image_size, config.image_seq_length)
  ours = model(jnp.asarray(ids), jnp.asarray(pixels))
  assert ours.dtype == jnp.float32 and ours.shape == (2, ids.shape[1], config.text.vocab_size)
  assert rel_err(ours, hf_logits(torch_model, ids, pixels)) <= 1e-4


def test_text_only_logits_match(checkpoint):
  torch_model, model, _, _ = checkpoint
  ids = np.random.default_rng(1).integers(0, 100, (2, 17)).astype(np.int32)
  assert rel_err(model(jnp.asarray(ids)), hf_logits(torch_model, ids, None)) <= 1e-4


def test_save_pretrained_round_trips_through_transformers(checkpoint, tmp_path):
  from transformers import InternVLForConditionalGeneration

  torch_model, model, config, _ = checkpoint
  hf.save_pretrained(model, config, tmp_path)
  reloaded = InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
  ids, pixels = random_inputs(config.vision.image_size, config.image_seq_length, seed=2)
  assert rel_err(hf_logits(reloaded, ids, pixels), hf_logits(torch_model, ids, pixels)) <= 1e-5


def test_sharded_save_has_an_index_and_loads_back(checkpoint, tmp_path):
  _, model, config, _ = checkpoint
  hf.save_pretrained(model, config, tmp_path, max_shard_bytes=20_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  again, _ = hf.load_pretrained(tmp_path)
  ids, pixels = random_inputs(config.vision.image_size, config.image_seq_length)
  np.testing.assert_array_equal(again(jnp.asarray(ids), jnp.asarray(pixels)), model(jnp.asarray(ids), jnp.asarray(pixels)))


def test_bfloat16_load_stays_close_to_float32(checkpoint):
  _, model, config, path = checkpoint
  model16, _ = hf.load_pretrained(path, dtype=jnp.bfloat16)
  ids, pixels = random_inputs(config.vision.image_size, config.image_seq_length)
  ref = model(jnp.asarray(ids), jnp.asarray(pixels))
  out = model16(jnp.asarray(ids), jnp.asarray(pixels))
  assert out.dtype == jnp.float32
  assert rel_err(out, ref) <= 2e-2


def test_position_embeddings_interpolate_for_a_new_image_size(tmp_path):
  torch_model = make_hf_model(image_size=56)
  torch_model.save_pretrained(tmp_path)
  model, _ = hf.load_pretrained(tmp_path)
  ids, pixels = random_inputs(84, 9)  # 84 px -> 6x6 patches -> 9 tokens after pixel shuffle
  assert rel_err(model(jnp.asarray(ids), jnp.asarray(pixels)), hf_logits(torch_model, ids, pixels)) <= 1e-4


def test_config_json_round_trips():
  torch_model = make_hf_model(text_type="qwen3", tie=True)
  ours = from_hf_dict(torch_model.config.to_dict())
  assert from_hf_dict(to_hf_dict(ours)) == ours
  assert ours.text.tie_word_embeddings and ours.text.model_type == "qwen3"


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
  make_hf_model().save_pretrained(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  missing = "language_model.model.norm.weight"
  del tensors[missing]
  tensors["language_model.model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
  wrong = "multi_modal_projector.linear_2.bias"
  tensors[wrong] = np.zeros((3,), np.float32)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(hf.CheckpointMismatchError) as e:
    hf.load_pretrained(tmp_path)
  message = str(e.value)
  assert "missing: language.norm.scale" in message
  assert "unexpected: language_model.model.layers.0.self_attn.extra.weight" in message
  assert f"wrong shape: {wrong}: checkpoint (3,), model expects (64,)" in message


def test_pickle_only_directory_is_refused(tmp_path):
  make_hf_model().save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="pickle"):
    hf.load_pretrained(tmp_path)


def test_too_few_images_for_the_placeholders_is_an_error(checkpoint):
  _, model, config, _ = checkpoint
  ids, pixels = random_inputs(config.vision.image_size, config.image_seq_length)
  with pytest.raises(ValueError, match="image placeholders"):
    model(jnp.asarray(ids), jnp.asarray(pixels[:1]))
