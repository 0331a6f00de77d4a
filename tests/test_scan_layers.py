"""The layer stacks (models/stack.py): remat policies and the scanned layout compute what the unrolled model does.

Tolerances (float32): the loss 1e-6 relative (measured: identical). Gradients and logits: each
tensor within 1e-5 of its own largest entry, plus 1e-8 absolute (`assert_close`). Remat replays
the same ops and the scan runs them in a loop, but XLA fuses (and so rounds) the recomputed or
looped ops differently: measured, the worst tensor differs by 1.7e-6 of its largest entry, single
entries by up to 1e-3 of their own (small) value, so a per-entry 1e-6 would test rounding. The
absolute 1e-8 is for the k-projection biases, whose exact gradient is zero (softmax ignores a
shift of a query's logits): both sides are rounding noise of ~3e-10.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from facellm_jax import export, hf
from facellm_jax.inference import load
from facellm_jax.models import lora as lora_lib
from facellm_jax.models import sharding, stack
from facellm_jax.models.config import FaceLLMConfig, TextConfig, VisionConfig
from facellm_jax.training import step as step_lib
from facellm_jax.training import validate
from hf_tiny import make_hf_model
from tiny_runs import tiny, trained_run

CONFIG = FaceLLMConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=56, patch_size=14),
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    image_token_id=5)
LOSS_RTOL, RTOL, ATOL = 1e-6, 1e-5, 1e-8


def assert_close(got, want, what: str = "") -> None:
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, what
  err = np.abs(got - want).max()
  assert err <= RTOL * np.abs(want).max() + ATOL, f"{what}: max |difference| {err:.3g}, max |value| {np.abs(want).max():.3g}"


def _batch(rows: int = 2, t: int = 12, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, 64, (rows, t)).astype(np.int32)
  ids[:, 1:5] = 5  # one image: 4 placeholders
  return {"input_ids": ids, "targets": np.roll(ids, -1, 1),
          "loss_mask": (rng.random((rows, t)) < 0.5).astype(np.float32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (rows, 1)),
          "segment_ids": np.ones((rows, t), np.int32), "num_images": np.ones(rows, np.int32),
          "pixel_values": rng.normal(size=(rows, 1, 56, 56, 3)).astype(np.float32)}


def _inputs(config: FaceLLMConfig, length: int = 20, seed: int = 1):
  """Two rows of random ids, each with one image's placeholders, and their NHWC pixels."""
  rng = np.random.default_rng(seed)
  n = config.image_seq_length
  ids = rng.integers(10, config.text.vocab_size, (2, length + n)).astype(np.int32)
  ids[0, 2:2 + n] = ids[1, 7:7 + n] = config.image_token_id
  size = config.vision.image_size
  return jnp.asarray(ids), jnp.asarray(rng.normal(size=(2, size, size, 3)).astype(np.float32))


def _model(trainable: str, *, scan: bool, remat: str = "none"):
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  lora = lora_lib.LoRAConfig(rank=2) if trainable == "lora" else None
  model = sharding.create_model(CONFIG, mesh, seed=0, lora=lora, scan_layers=scan)
  if lora is not None:  # fresh adapters have b = 0: move them so that they matter
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
      var.set_value(var.get_value() + 0.01)
  return stack.set_remat(model, remat)


def unrolled_flat(state: nnx.State) -> dict[str, np.ndarray]:
  """{unrolled path: value} of a state in either layout (a stacked Variable gives one entry per layer)."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    name, value = ".".join(map(str, path)), np.asarray(var.get_value() if isinstance(var, nnx.Variable) else var)
    if stack.unrolled_path(name, 0) is None:
      out[name] = value
    else:
      out.update({stack.unrolled_path(name, i): value[i] for i in range(value.shape[0])})
  return out


def loss_and_grads(model, trainable: str):
  batch = jax.tree.map(jnp.asarray, _batch())
  fn = lambda m: step_lib._micro_loss(m, batch, jnp.asarray(7.0), 0)  # pylint: disable=protected-access
  grad = nnx.value_and_grad(fn, argnums=nnx.DiffState(0, lora_lib.trainable_filter(trainable)), has_aux=True)
  (loss, _), grads = jax.jit(lambda m: grad(m))(model)
  return float(loss), unrolled_flat(grads)


@pytest.fixture(scope="module", params=["full", "lora"])
def reference(request):
  return request.param, loss_and_grads(_model(request.param, scan=False), request.param)


# Every policy in both layouts, spread over the two trainable kinds (each case is one compile).
CASES = {"full": [(False, "full"), (False, "dots"), (True, "none"), (True, "dots")],
         "lora": [(True, "none"), (True, "full")]}


def test_remat_and_scan_give_the_unrolled_loss_and_gradients(reference):
  trainable, (want_loss, want_grads) = reference
  for scan, remat in CASES[trainable]:
    loss, grads = loss_and_grads(_model(trainable, scan=scan, remat=remat), trainable)
    case = f"{trainable}, {'scanned' if scan else 'unrolled'}, remat={remat}"
    np.testing.assert_allclose(loss, want_loss, rtol=LOSS_RTOL, err_msg=case)
    assert grads.keys() == want_grads.keys() and len(grads) > 0
    for key, want in want_grads.items():
      assert_close(grads[key], want, f"{case}: {key}")


def test_scanned_model_gives_the_unrolled_logits_and_stacks_every_layer():
  unrolled, scanned = _model("lora", scan=False), _model("lora", scan=True)
  ids, pixels = _inputs(CONFIG)
  want = np.asarray(unrolled(ids, pixels))
  assert_close(scanned(ids, pixels), want, "scanned logits")
  assert isinstance(scanned.language.layers, stack.Stacked) and len(scanned.language.layers) == 3
  kernel = scanned.language.layers.layer.attn.q_proj.kernel
  assert kernel.shape == (3, 32, 32) and kernel.get_metadata()["axes"] == ("layers", "embed", "q_heads")
  adapter = scanned.vision.layers.layer.fc1.kernel.shape, scanned.language.layers.layer.mlp.up_proj.lora.lora_a.shape
  assert adapter == ((2, 32, 64), (3, 32, 2))
  # Same values slice by slice (LoRA adapters drawn in the unrolled order), and back again.
  assert unrolled_flat(nnx.state(scanned)).keys() == unrolled_flat(nnx.state(unrolled)).keys()
  for key, value in unrolled_flat(nnx.state(scanned)).items():
    np.testing.assert_array_equal(value, unrolled_flat(nnx.state(unrolled))[key], err_msg=key)
  back = stack.unstack(scanned)
  assert_close(back(ids, pixels), want, "unstacked logits")


def test_kv_cache_refuses_the_scanned_layout():
  model = _model("full", scan=True)
  with pytest.raises(ValueError, match="unstack"):
    model.language(jnp.zeros((1, 2, 32)), jnp.zeros((1, 2), jnp.int32), None, model.language.init_cache(1, 4),
                   jnp.int32(0))


def test_hf_import_into_the_scanned_layout_and_export_back_are_bit_identical(tmp_path):
  make_hf_model().save_pretrained(tmp_path)
  unrolled, _ = hf.load_pretrained(tmp_path)
  scanned, _ = hf.load_pretrained(tmp_path, scan_layers=True)
  assert stack.is_stacked(scanned) and not stack.is_stacked(unrolled)
  want, got = unrolled_flat(nnx.state(unrolled)), unrolled_flat(nnx.state(scanned))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  exported, reference = hf.export_state(scanned), hf.export_state(unrolled)
  assert exported.keys() == reference.keys()
  for key in reference:
    np.testing.assert_array_equal(np.asarray(exported[key]), np.asarray(reference[key]), err_msg=key)


def test_scanned_hf_import_lands_sharded_and_names_missing_layers(tmp_path):
  make_hf_model().save_pretrained(tmp_path / "hf")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  config = hf.read_config(tmp_path / "hf")
  shardings = sharding.state_shardings(hf.abstract_model(config, scan_layers=True), mesh)
  model, _ = hf.load_pretrained(tmp_path / "hf", shardings=shardings, scan_layers=True)
  kernel = model.language.layers.layer.mlp.gate_proj.kernel.get_value()
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  plain, _ = hf.load_pretrained(tmp_path / "hf")
  np.testing.assert_array_equal(np.asarray(kernel[1]), np.asarray(plain.language.layers[1].mlp.gate_proj.kernel[...]))
  tensors = load_file(str(tmp_path / "hf/model.safetensors"))
  dropped = [k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight")]
  assert len(dropped) == 1
  save_file({k: v for k, v in tensors.items() if k not in dropped}, str(tmp_path / "hf/model.safetensors"))
  with pytest.raises(hf.CheckpointMismatchError, match=r"missing: language\.layers\.1\.mlp\.up_proj\.kernel"):
    hf.load_pretrained(tmp_path / "hf", scan_layers=True)


def test_stacked_params_shard_on_4_devices_with_the_layer_axis_whole():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  model = sharding.create_model(CONFIG, mesh, lora=lora_lib.LoRAConfig(rank=2), scan_layers=True)
  sharding.assert_sharded(model, mesh, min_size=1024)
  layer = model.language.layers.layer
  shapes = {name: {s.data.shape for s in x.addressable_shards}
            for name, x in [("q_proj", layer.attn.q_proj.kernel.get_value()),  # [3, 32, 32]
                            ("down_proj", layer.mlp.down_proj.kernel.get_value()),  # [3, 48, 32]
                            ("lora_a", layer.mlp.gate_proj.lora.lora_a.get_value()),  # [3, 32, 2]
                            ("vit_fc1", model.vision.layers.layer.fc1.kernel.get_value()),  # [2, 32, 64]
                            ("norm", layer.input_norm.scale.get_value())]}  # [3, 32]
  assert shapes == {"q_proj": {(3, 16, 16)}, "down_proj": {(3, 24, 16)}, "lora_a": {(3, 16, 2)},
                    "vit_fc1": {(2, 16, 32)}, "norm": {(3, 32)}}


@pytest.mark.parametrize("variant", ["lora", "full"])
def test_scanned_run_restores_and_exports_the_logits_of_the_unrolled_run(tmp_path_factory, offline_dataset,
                                                                         variant, tmp_path):
  steps = 1 if variant == "full" else 3
  unrolled = trained_run(tmp_path_factory, offline_dataset, variant, num_steps=steps)
  scanned = trained_run(tmp_path_factory, offline_dataset, variant, num_steps=steps, scan_layers=True)
  checkpointed = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(scanned.state[0])]
  assert any(".layers.layer." in p for p in checkpointed) and not any(".layers.0." in p for p in checkpointed)
  assert export.main(["--workdir", str(scanned.workdir), "--out", str(tmp_path / "hf")]) == 0
  logits = {}
  for name, source in (("unrolled", dict(workdir=unrolled.workdir)), ("scanned", dict(workdir=scanned.workdir)),
                       ("exported", dict(hf_dir=tmp_path / "hf"))):
    model, config, _ = load.load_for_inference(**source)
    assert not stack.is_stacked(model)
    logits[name] = np.asarray(model(*_inputs(config)))
  assert_close(logits["exported"], logits["scanned"], "exported")
  # The two runs' weights differ by the rounding of their gradients, through AdamW: its first step
  # moves every weight by about lr * sign(gradient), so a gradient that is rounding noise in both
  # (the k-projection biases of a full run) moves by +-lr in either direction.
  tolerance = 1 if variant == "lora" else 100
  assert np.abs(logits["scanned"] - logits["unrolled"]).max() <= tolerance * RTOL * np.abs(logits["unrolled"]).max()


def test_bad_remat_is_a_one_line_config_error():
  cfg = tiny.get_config().unlock()
  cfg.data.dir = "/data"
  cfg.train.remat = "everything"
  with pytest.raises(validate.ConfigError) as e:
    validate.check_config(cfg)
  assert str(e.value) == "train.remat must be one of ['none', 'full', 'dots'], got 'everything'"
