"""Inference on a device mesh: same tokens as one device, weights and KV cache really sharded, one-line errors."""

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from facellm_jax import evaluate as evaluate_cli
from facellm_jax import hf
from facellm_jax.evaluation import facexbench
from facellm_jax.inference import answer, load
from facellm_jax.inference.generate import Generator
from hf_tiny import IMAGE_TOKEN_ID as IMG, make_hf_model, save_hf_model
from test_evaluate_cli import NEW_TOKENS, write_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
EOS = (126, 127)
NEW = 8
# data x tensor over 4 of the 8 fake CPU devices (conftest), and one device as the reference.
MESHES = {"data=2,tensor=2": 4, "tensor=4": 4}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, lora_workdir):
  """A tiny random InternVL with 4 query and 4 kv heads (so tensor=4 splits the cache by heads)."""
  path = save_hf_model(make_hf_model(kv_heads=4, scale=0.3), tmp_path_factory.mktemp("hf_kv4"))
  shutil.copyfile(lora_workdir / "tokenizer" / "tokenizer.json", path / "tokenizer.json")
  return path


def _mesh(config, shape: str, devices: int):
  return load.inference_mesh(config, shape, jax.devices()[:devices])


def _load_hf(hf_dir, shape: str, devices: int) -> load.Loaded:
  return load.load_checkpoint(hf_dir=hf_dir, mesh=_mesh(hf.read_config(hf_dir), shape, devices))


def _prompts():
  rng = np.random.default_rng(1)
  text = lambda n: rng.integers(1, 110, n).tolist()
  prompts = [text(3) + [IMG] * 4 + text(5), text(9) + [IMG] * 4 + text(2) + [IMG] * 4 + text(4), text(7)]
  return prompts, rng.standard_normal((3, 56, 56, 3)).astype(np.float32)


def _generate(model):
  return Generator(model, max_new_tokens=NEW, eos_ids=EOS, pad_id=0)(*_prompts())


@pytest.fixture(scope="module")
def one_device_tokens(hf_dir):
  return _generate(_load_hf(hf_dir, "data=1", 1).model)


def _shard(x) -> tuple[int, ...]:
  return x.sharding.shard_shape(x.shape)


@pytest.mark.parametrize("shape", MESHES)
def test_greedy_tokens_and_shards_on_a_mesh(hf_dir, one_device_tokens, shape):
  loaded = _load_hf(hf_dir, shape, MESHES[shape])
  data, tensor = loaded.mesh.shape["data"], loaded.mesh.shape["tensor"]
  attn = loaded.model.language.layers[0].attn
  # q/k/v [64, 4 heads x 16] and o [4 x 16, 64] split by heads; the LM head [64, 128] by vocabulary.
  assert _shard(attn.q_proj.kernel[...]) == (64, 64 // tensor)
  assert _shard(attn.k_proj.kernel[...]) == (64, 64 // tensor)
  assert _shard(attn.o_proj.kernel[...]) == (64 // tensor, 64)
  assert _shard(loaded.model.language.lm_head[...]) == (64, 128 // tensor)
  generator = Generator(loaded.model, max_new_tokens=NEW, eos_ids=EOS, pad_id=0)
  cache = generator._prefill(*_prompts(), NEW)[3]  # pylint: disable=protected-access
  rows = 4 if data == 2 else 3  # 3 prompts, topped up to a multiple of data
  assert cache[0].k.shape == (rows, 128, 4, 16)  # 64-token prompt bucket + 7 new, rounded to 64
  assert _shard(cache[0].k) == (rows // data, 128, 4 // tensor, 16)
  assert generator(*_prompts()) == one_device_tokens
  assert len(set(map(len, one_device_tokens))) == 1 and len(one_device_tokens[0]) == NEW  # no early EOS hid a row


def test_streamed_tokens_on_a_mesh_match_one_device(hf_dir, one_device_tokens):
  loaded = _load_hf(hf_dir, "data=2,tensor=2", 4)
  prompts, pixels = _prompts()
  generator = Generator(loaded.model, max_new_tokens=NEW, eos_ids=EOS, pad_id=0)
  assert list(generator.stream(prompts[2], None)) == one_device_tokens[2]


def test_workdir_restores_into_the_mesh_shardings(lora_workdir):
  """The LoRA run's adapters come from Orbax on the mesh, merged; same logits as on one device."""
  config = load.loop.model_config(load.read_workdir_config(lora_workdir))
  sharded = load.load_checkpoint(lora_workdir, mesh=_mesh(config, "data=2,tensor=2", 4))
  single = load.load_checkpoint(lora_workdir, mesh=_mesh(config, "data=1", 1))
  kernel = sharded.model.language.layers[0].attn.q_proj.kernel[...]
  assert kernel.shape == (128, 128) and _shard(kernel) == (128, 64)
  ids = np.arange(1, 21, dtype=np.int32)[None].repeat(2, 0)
  forward = jax.jit(lambda graphdef, state: nnx.merge(graphdef, state)(ids), static_argnums=0)  # eager ops
  np.testing.assert_allclose(np.asarray(forward(*nnx.split(sharded.model))),  # would compile one by one
                             np.asarray(forward(*nnx.split(single.model))), atol=1e-5)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  return write_benchmark(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def one_device_eval(lora_workdir, bench, tmp_path_factory):
  """The benchmark answered on one device through the library (what `evaluate` does unsharded)."""
  config = load.loop.model_config(load.read_workdir_config(lora_workdir))
  model, config, tokenizer = load.load_for_inference(lora_workdir, mesh=_mesh(config, "data=1", 1))
  generate_fn = answer.make_generate_fn(model, config, tokenizer, max_new_tokens=NEW_TOKENS, batch_size=2,
                                        max_tiles=1)
  out = tmp_path_factory.mktemp("one")
  return out, facexbench.evaluate(facexbench.load_benchmark(bench), generate_fn, out, batch_size=2)


def _argv(workdir, bench, out, *extra):
  return ["--workdir", str(workdir), "--facexbench", str(bench), "--out", str(out), "--batch_size", "2",
          "--max_new_tokens", str(NEW_TOKENS), "--max_tiles", "1", *extra]


def _predictions(folder):
  return sorted((folder / "predictions.jsonl").read_text().splitlines())


def test_evaluate_on_a_mesh_writes_the_unsharded_report(lora_workdir, bench, one_device_eval, tmp_path):
  out = tmp_path / "mesh" / "report.json"
  assert evaluate_cli.main(_argv(lora_workdir, bench, out, "--mesh", "data=2,fsdp=2,tensor=2")) == 0
  report = json.loads(out.read_text())
  assert {k: report[k] for k in one_device_eval[1]} == one_device_eval[1]
  assert _predictions(out.parent) == _predictions(one_device_eval[0])


def test_two_processes_resume_and_write_the_one_report(lora_workdir, bench, one_device_eval, tmp_path):
  """Process 0 already holds two answers; the two processes share the other three (2 + 1 of them in
  the first global batch of 4, one alone in the last) and only process 0 writes."""
  out = tmp_path / "two" / "report.json"
  out.parent.mkdir()
  (out.parent / "predictions.jsonl").write_text("\n".join(_predictions(one_device_eval[0])[:2]) + "\n")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "facellm_jax.evaluate", *_argv(lora_workdir, bench, out, "--mesh", "data=2"),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "report:" in logs[0] and "report:" not in logs[1]
  report = json.loads(out.read_text())
  assert {k: report[k] for k in one_device_eval[1]} == one_device_eval[1]
  assert _predictions(out.parent) == _predictions(one_device_eval[0])


@pytest.mark.parametrize("mesh, expected", [
    ("data=3", "needs 3 devices but 8 are available"),
    ("data=2,tensor=4", "tensor=4 does not divide the model's 4 query / 2 kv heads"),
    ("data=2,pipeline=4", "expected comma-separated AXIS=SIZE"),
])
def test_bad_mesh_is_a_one_line_error(lora_workdir, bench, tmp_path, capsys, mesh, expected):
  argv = ["--workdir", str(lora_workdir), "--facexbench", str(bench), "--out", str(tmp_path / "out/r.json"),
          "--mesh", mesh]
  try:
    code = evaluate_cli.main(argv)
  except SystemExit as e:  # argparse's usage errors
    code = e.code
  err = capsys.readouterr().err
  assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "out").exists()


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is in the test extra")


@needs_libtpu
def test_compile_only_reports_prefill_and_decode_bytes_per_chip(capsys):
  argv = ["--compile_only", f"--config={ROOT / 'configs/tiny.py'}", "--topology=v5p-8", "--batch_size=4",
          "--cache_len=256"]
  assert evaluate_cli.main(argv) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["chips"] == 4 and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert (report["rows_per_chip"], report["prompt_len"], report["cache_len"]) == (2, 192, 256)
  for step in ("prefill", "decode"):
    b = report[step]["bytes_per_chip"]
    assert report[step]["fits"] and b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"]
  # The decode step holds this chip's cache: 4 layers x k and v x 2 rows x 256 slots x 1 kv head x 32 x bf16.
  assert report["decode"]["bytes_per_chip"]["arguments"] >= 4 * 2 * 2 * 256 * 1 * 32 * 2
  assert report["fits"]


@needs_libtpu
def test_compile_only_with_a_bad_mesh_is_a_one_line_error(capsys):
  argv = ["--compile_only", f"--config={ROOT / 'configs/tiny.py'}", "--topology=v5p-8", "--mesh", "tensor=4"]
  assert evaluate_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "tensor=4 does not divide" in err and len(err.strip().splitlines()) == 1
