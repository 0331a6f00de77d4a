"""End-to-end training runs of the tiny config on the shared offline-generated dataset."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from facellm_jax import train as train_cli
from facellm_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402  pylint: disable=wrong-import-position
from test_summaries import read_scalars  # noqa: E402  pylint: disable=wrong-import-position

# Two decoder layers (instead of tiny's four) halve the compile time every run pays.
OVERRIDES = {"data.cutoff_len": 128, "train.log_every": 1, "train.warmup_ratio": 0.0,
             "model.text.num_hidden_layers": 2}


def _config(data_dir, **kw):
  cfg = tiny.get_config().unlock()
  cfg.data.dir = str(data_dir)
  for key, value in {**OVERRIDES, **kw}.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg.lock()


@pytest.fixture(scope="module")
def dataset(offline_dataset):
  return offline_dataset


@pytest.fixture(scope="module")
def tokenizer_dir(dataset, tmp_path_factory):
  """One tokenizer for every run, so runs in different workdirs see the same token ids."""
  w = tmp_path_factory.mktemp("tok")
  loop.train(_config(dataset, **{"train.num_steps": 0}), w, show_progress=False,
             devices=jax.devices()[:1])
  return w / "tokenizer"


@pytest.fixture(scope="module")
def single_device_run(dataset, tokenizer_dir, tmp_path_factory):
  cfg = _config(dataset, **{"train.num_steps": 12, "tokenizer.path": str(tokenizer_dir),
                            "mesh.shape.data": 1})
  workdir = tmp_path_factory.mktemp("one")
  result = loop.train(cfg, workdir, show_progress=False, devices=jax.devices()[:1])
  result.workdir = workdir
  return result


def _losses(metrics):
  return np.array([m["loss"] for m in metrics])


def _cli(workdir, dataset, tokenizer_dir, *extra, devices=1, env=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",  # inherits conftest's compilation cache
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
  cmd = [sys.executable, "-m", "facellm_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.dir={dataset}", f"--config.tokenizer.path={tokenizer_dir}", "--progress=false",
         *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *extra]
  # A file, not a pipe: nobody reads a pipe while waiting, and a full one blocks the run.
  log = open(f"{workdir}.{len(list(pathlib.Path(workdir).parent.glob('*.log')))}.log", "w")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log = log.name
  return proc


def _tail(proc):
  return pathlib.Path(proc.log).read_text()[-3000:]


def _read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_config_loss_falls_below_half(dataset, tokenizer_dir, tmp_path):
  cfg = _config(dataset, **{"train.num_steps": 60, "tokenizer.path": str(tokenizer_dir),
                            "train.log_every": 10, "checkpoint.every_steps": 1000})
  result = loop.train(cfg, tmp_path, show_progress=False, devices=jax.devices()[:1])
  losses = _losses(result.metrics)
  print("loss start %.3f end %.3f" % (losses[0], losses[-1]))
  assert losses[-1] < 0.5 * losses[0]
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 10, 20, 30, 40, 50, 60]
  assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "examples_per_s"} <= set(logged[0])
  assert read_scalars(tmp_path / "tensorboard", "train/loss") == [(m["step"], m["loss"]) for m in logged]


def test_data_and_fsdp_sharding_match_one_device(dataset, tokenizer_dir, single_device_run, tmp_path):
  cfg = _config(dataset, **{"train.num_steps": 12, "tokenizer.path": str(tokenizer_dir),
                            "mesh.shape.data": 2, "mesh.shape.fsdp": 2})
  sharded = loop.train(cfg, tmp_path, show_progress=False, devices=jax.devices()[:4])
  np.testing.assert_allclose(_losses(sharded.metrics), _losses(single_device_run.metrics), rtol=1e-4)
  embed = sharded.state[0]["language"]["embed"][...]
  assert embed.sharding.shard_shape(embed.shape)[1] == embed.shape[1] // 2  # embed axis over fsdp=2


def test_lora_run_saves_only_adapters_and_resumes(dataset, tokenizer_dir, tmp_path):
  cfg = _config(dataset, **{"train.num_steps": 2, "tokenizer.path": str(tokenizer_dir),
                            "checkpoint.every_steps": 1, "train.trainable": "lora"}).unlock()
  first = loop.train(cfg, tmp_path, show_progress=False, devices=jax.devices()[:1])
  params = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints/2/params").item_metadata
  leaves = jax.tree_util.tree_flatten_with_path(dict(params))[0]
  names = {str(path[-1].key) for path, _ in leaves}
  assert names == {"lora_a", "lora_b"}
  cfg.train.num_steps = 3
  resumed = loop.train(cfg, tmp_path, show_progress=False, devices=jax.devices()[:1])
  assert [m["step"] for m in first.metrics] == [1, 2]
  assert [m["step"] for m in resumed.metrics] == [3]


def test_killed_run_resumes_with_identical_losses(dataset, tokenizer_dir, tmp_path):
  # The step count of the two-process run (and of test_gcs_workdir): one compiled step for all of them.
  extra = ("--config.train.num_steps=12", "--config.checkpoint.every_steps=4")
  full = _cli(tmp_path / "full", dataset, tokenizer_dir, *extra)
  assert full.wait(timeout=300) == 0, _tail(full)
  reference = {m["step"]: m["loss"] for m in _read_metrics(tmp_path / "full")}
  params = ocp.StandardCheckpointer().metadata(tmp_path / "full/checkpoints/12/params").item_metadata
  assert {"vision", "projector", "language"} <= set(dict(params))  # a full run saves every param.

  killed = _cli(tmp_path / "killed", dataset, tokenizer_dir, *extra)
  ckpt = tmp_path / "killed/checkpoints/4"
  while not ckpt.exists() and killed.poll() is None:
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  rerun = _cli(tmp_path / "killed", dataset, tokenizer_dir, *extra)
  assert rerun.wait(timeout=300) == 0, _tail(rerun)
  after = _read_metrics(tmp_path / "killed")
  assert [m["step"] for m in after] == list(range(1, 13))  # each step once: lines past the restore relogged
  assert {m["step"]: m["loss"] for m in after} == reference
  # TensorBoard too: the steps the killed run logged past its checkpoint are purged, relogged once.
  assert read_scalars(tmp_path / "killed/tensorboard", "train/loss") == [(m["step"], m["loss"]) for m in after]


def test_two_processes_match_single_process(dataset, tokenizer_dir, single_device_run, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [
      _cli(tmp_path / "run", dataset, tokenizer_dir, "--config.train.num_steps=12",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
      for i in range(2)]
  for p in procs:
    assert p.wait(timeout=400) == 0, _tail(p)
  losses = np.array([m["loss"] for m in _read_metrics(tmp_path / "run")])
  np.testing.assert_allclose(losses, _losses(single_device_run.metrics), rtol=1e-4)


@pytest.mark.parametrize("args, expected", [
    (["--config.data.dir=/nonexistent/ds"], "data.dir /nonexistent/ds does not exist"),
    (["--config.mesh.shape.data=3"], "needs 3 devices but 8 are available"),
    (["--config.train.batch_size=6"], "train.batch_size=6 must split"),
])
def test_bad_input_is_a_one_line_error(dataset, tokenizer_dir, tmp_path, capsys, args, expected):
  code = train_cli.main(["train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                         f"--config.data.dir={dataset}", f"--config.tokenizer.path={tokenizer_dir}", *args])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith("error: ") and expected in err and "\n" not in err
  assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())


def test_unknown_config_key_is_a_flag_error(tmp_path, capsys):
  code = train_cli.main(["train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                         "--config.train.no_such_key=1"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith("error: ") and "no_such_key" in err and "\n" not in err


def test_checkpoint_of_another_model_is_refused(dataset, tokenizer_dir, single_device_run, capsys):
  workdir = single_device_run.workdir
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  code = train_cli.main(["train", "--config=configs/tiny.py", f"--workdir={workdir}", *args,
                         f"--config.data.dir={dataset}", f"--config.tokenizer.path={tokenizer_dir}",
                         "--config.model.text.hidden_size=64", "--config.train.num_steps=20"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "different run setup" in err and "model" in err
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12"]


def test_sigterm_saves_then_resumes_identically(dataset, tokenizer_dir, single_device_run, tmp_path):
  cfg = _config(dataset, **{"train.num_steps": 12, "tokenizer.path": str(tokenizer_dir),
                            "mesh.shape.data": 1})

  def preempt_after_two_steps():
    metrics = tmp_path / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=preempt_after_two_steps, daemon=True).start()
  with pytest.raises(loop.Preempted):
    loop.train(cfg, tmp_path, show_progress=False, devices=jax.devices()[:1])
  saved = int(max((tmp_path / "checkpoints").iterdir(), key=lambda p: int(p.name)).name)
  assert 2 <= saved < 12
  resumed = loop.train(cfg, tmp_path, show_progress=False, devices=jax.devices()[:1])
  assert resumed.metrics[0]["step"] == saved + 1
  assert _losses(resumed.metrics).tolist() == _losses(single_device_run.metrics)[saved:].tolist()
  assert read_scalars(tmp_path / "tensorboard", "train/loss") == [
      (m["step"], m["loss"]) for m in single_device_run.metrics]
