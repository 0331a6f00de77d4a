"""`train.base_dtype`: a LoRA run's frozen base in bfloat16 (adapters and optimizer state float32)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facellm_jax import hf
from facellm_jax.models import lora as lora_lib
from facellm_jax.models import sharding
from facellm_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402  pylint: disable=wrong-import-position


def _config(data_dir, **train):
  cfg = tiny.get_config("lora").unlock()
  cfg.data.dir, cfg.data.cutoff_len = str(data_dir), 128
  cfg.model.text.num_hidden_layers = 2
  cfg.mesh.shape.data = 1
  cfg.train.update(dict(num_steps=30, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, log_every=5,
                        base_dtype="bfloat16"), **train)
  cfg.checkpoint.every_steps = 1000
  return cfg.lock()


def _run(data_dir, workdir, base_dtype, tokenizer=""):
  cfg = _config(data_dir, base_dtype=base_dtype).unlock()
  cfg.tokenizer.path = str(tokenizer)
  return loop.train(cfg.lock(), workdir, show_progress=False, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def bf16_run(offline_dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bf16_base")
  return _run(offline_dataset, workdir, "bfloat16"), workdir


def test_auto_is_bfloat16_for_lora_on_accelerators_only():
  lora, full = tiny.get_config("lora"), tiny.get_config("full")
  assert [loop.base_dtype(lora, p) for p in ("tpu", "gpu", "cpu")] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
  assert loop.base_dtype(full, "tpu") == jnp.float32


def test_bfloat16_base_for_full_fine_tuning_is_a_config_error():
  cfg = tiny.get_config("full").unlock()
  cfg.train.base_dtype = "bfloat16"
  with pytest.raises(loop.ConfigError, match="train.base_dtype=bfloat16 is for LoRA"):
    loop.base_dtype(cfg, "tpu")


def test_bf16_base_lora_learns_as_the_float32_base_does(bf16_run, offline_dataset, tmp_path):
  result, workdir = bf16_run
  bf16 = np.array([m["loss"] for m in result.metrics])
  f32 = np.array([m["loss"] for m in _run(offline_dataset, tmp_path, "float32", workdir / "tokenizer").metrics])
  assert bf16[-1] < 0.9 * bf16[0] and f32[-1] < 0.9 * f32[0], (bf16, f32)
  # The same start and end, up to the bfloat16 rounding of the base (measured: 0.9% and 0.2% apart
  # on the first renderer's faces, 1.0% and 2.0% on today's stronger blur/grain/JPEG cues).
  np.testing.assert_allclose(bf16[0], f32[0], rtol=0.02)
  np.testing.assert_allclose(bf16[-1], f32[-1], rtol=0.03)


def test_bf16_base_keeps_adapters_and_optimizer_state_float32(bf16_run):
  result, _ = bf16_run
  model_state, opt_state = result.state[0], result.state[1]
  dtypes = {(isinstance(v, nnx.LoRAParam), v.get_value().dtype) for _, v in nnx.to_flat_state(model_state)}
  assert dtypes == {(False, jnp.dtype(jnp.bfloat16)), (True, jnp.dtype(jnp.float32))}
  assert {x.dtype for x in jax.tree.leaves(opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}


def test_bf16_base_merges_and_exports_as_bfloat16(bf16_run, tmp_path):
  result, _ = bf16_run
  cfg = _config(".")
  model = loop.build_model(cfg, loop.model_config(cfg), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  nnx.update(model, result.state[0])  # the trained (model, optimizer) state's model half
  q = model.language.layers[0].attn.q_proj
  expected = (q.kernel[...].astype(jnp.float32) + q.lora.delta()).astype(jnp.bfloat16)
  assert float(jnp.abs(q.lora.delta()).max()) > 0  # the adapters did train
  lora_lib.merge_lora(model)
  np.testing.assert_array_equal(np.asarray(q.kernel[...]), np.asarray(expected))
  out = hf.save_pretrained(model, model.config, tmp_path / "hf")
  loaded, _ = hf.load_pretrained(out, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(loaded.language.layers[0].attn.q_proj.kernel[...]), np.asarray(expected))
