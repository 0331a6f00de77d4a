"""Faults and bad input on the training side (issue 15): each one line and exit 2, or a clean resume.

Damaged checkpoints fall back to the latest intact step (train sets the damaged one aside);
Ctrl-C saves like SIGTERM; every config value is checked with its key's name before anything
is written; permissions are tested as an unprivileged user (root ignores file modes).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from facellm_jax import chat, evaluate, export
from facellm_jax import train as train_cli
from facellm_jax.inference import load
from facellm_jax.training import loop
from flax import nnx
from test_evaluate_cli import write_benchmark
from tiny_runs import face_png
from unprivileged import give_away, open_up, python_unprivileged

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402  pylint: disable=wrong-import-position

OVERRIDES = {"data.cutoff_len": 128, "train.log_every": 1, "train.warmup_ratio": 0.0,
             "model.text.num_hidden_layers": 2, "checkpoint.every_steps": 2, "checkpoint.keep": 3}


def _config(dataset, tokenizer=None, **kw):
  cfg = tiny.get_config().unlock()
  cfg.data.dir = str(dataset)
  if tokenizer:
    cfg.tokenizer.path = str(tokenizer)
  for key, value in {**OVERRIDES, "mesh.shape.data": 1, **kw}.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg.lock()


def _train(cfg, workdir):
  return loop.train(cfg, workdir, show_progress=False, devices=jax.devices()[:1])


def _argv(workdir, dataset, *extra):
  return ["train", "--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.dir={dataset}",
          "--progress=false", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *extra]


def _one_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


def _records(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir):
  return [r["step"] for r in _records(workdir)]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir)}


@pytest.fixture(scope="module")
def runs(offline_dataset, tmp_path_factory):
  """A 6-step run with checkpoints 2, 4 and 6: the reference, and what the damage tests copy."""
  root = tmp_path_factory.mktemp("faults")
  _train(_config(offline_dataset, **{"train.num_steps": 6}), root / "six")
  return root, root / "six/tokenizer"


def _stopped_after_four(root, workdir):
  """The reference run as a run killed after checkpoint 4 leaves it; its metrics up to step 6
  stay, so the lines past the restored step must be dropped."""
  shutil.copytree(root / "six", workdir)
  shutil.rmtree(workdir / "checkpoints/6")
  return workdir


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((step_dir / "params/ocdbt.process_0/d").iterdir(), key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda d: _truncate(_largest_array_file(d)), "OUT_OF_RANGE"),
    (lambda d: (d / "data/process_0-of-1.json").write_text("{broken"), "data/process_0-of-1.json is not valid JSON"),
])
def test_damaged_latest_checkpoint_is_set_aside_and_training_resumes_from_the_previous_step(
    runs, offline_dataset, tmp_path, capsys, damage, named):
  root, tokenizer = runs
  workdir = _stopped_after_four(root, tmp_path / "w")
  damage(workdir / "checkpoints/4")
  before = sorted(str(p.relative_to(workdir / "checkpoints/4")) for p in (workdir / "checkpoints/4").rglob("*"))
  _train(_config(offline_dataset, tokenizer, **{"train.num_steps": 6}), workdir)
  warning = capsys.readouterr().err.strip().splitlines()
  assert len(warning) == 1 and warning[0].startswith("warning: checkpoint step 4") and named in warning[0]
  assert "falling back to step 2" in warning[0]
  aside = [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("4.damaged-")]
  assert len(aside) == 1 and f"set aside as {aside[0].name}" in warning[0]
  assert sorted(str(p.relative_to(aside[0])) for p in aside[0].rglob("*")) == before  # nothing deleted
  assert _steps(workdir) == [1, 2, 3, 4, 5, 6]  # steps 3 to 6 logged again, each once
  assert _losses(workdir) == _losses(root / "six")


def test_inference_falls_back_past_a_damaged_step_without_touching_the_workdir(runs, tmp_path, capsys):
  root, _ = runs
  workdir = tmp_path / "w"
  shutil.copytree(root / "six", workdir)
  (workdir / "checkpoints/6/meta/metadata").write_text("{broken")
  loaded = load.load_checkpoint(workdir)
  warning = capsys.readouterr().err.strip()
  assert loaded.step == 4 and warning.startswith("warning: checkpoint step 6")
  assert "checkpoints/6/meta/metadata is not valid JSON" in warning and "falling back to step 4" in warning
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]  # read-only: nothing moved
  expected = load.load_checkpoint(root / "six", step=4)
  for a, b in zip(jax.tree.leaves(nnx.state(loaded.model)), jax.tree.leaves(nnx.state(expected.model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  image = face_png(tmp_path / "face.png", 0)
  assert chat.main(["--workdir", str(workdir), "--image", str(image), "--max_new_tokens", "2", "Age?"]) == 0
  assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "hf")]) == 0
  assert "falling back to step 4" in capsys.readouterr().err
  # An explicit --step that is damaged is an error, not a silent fallback.
  assert export.main(["--workdir", str(workdir), "--step", "6", "--out", str(tmp_path / "hf6")]) == 2
  err = _one_line(capsys)
  assert "checkpoint step 6" in err and "no intact checkpoint is left" in err
  assert not (tmp_path / "hf6").exists()


def test_ctrl_c_saves_then_the_rerun_resumes_with_identical_losses_and_no_repeated_metrics(
    runs, offline_dataset, tmp_path):
  root, tokenizer = runs
  cfg = _config(offline_dataset, tokenizer, **{"train.num_steps": 6})

  def interrupt_after_three_steps():
    metrics = tmp_path / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=interrupt_after_three_steps, daemon=True).start()
  with pytest.raises(loop.Preempted) as stopped:
    _train(cfg, tmp_path)
  assert stopped.value.signum == signal.SIGINT and str(stopped.value).startswith("stopped by SIGINT after step")
  saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert 3 <= saved < 6 and _steps(tmp_path) == list(range(1, saved + 1))  # saved where it stopped
  _train(cfg, tmp_path)
  assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
  assert _losses(tmp_path) == _losses(root / "six")


def test_ctrl_c_of_the_cli_saves_and_exits_130_with_the_resume_message(offline_dataset, runs, tmp_path):
  _, tokenizer = runs
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  with open(tmp_path / "log", "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "facellm_jax.train", *_argv(tmp_path / "w", offline_dataset)[1:],
                             f"--config.tokenizer.path={tokenizer}", "--config.train.num_steps=50"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    while not (tmp_path / "w/metrics.jsonl").exists() and proc.poll() is None:
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
  last = (tmp_path / "log").read_text().strip().splitlines()[-1]
  assert last.startswith("stopped by SIGINT after step") and "rerun the same command to resume" in last
  step = int(last.split("after step ")[1].split(";")[0])
  assert (tmp_path / f"w/checkpoints/{step}/commit_success.txt").exists()


@pytest.mark.parametrize("override, key", [
    ("train.num_steps=-4", "train.num_steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),
    ("train.schedule=linear", "train.schedule"),
    ("train.compute_dtype=float16", "train.compute_dtype"),
    ("train.seed=-1", "train.seed"),
    ("train.trainable=adapters", "train.trainable"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("data.cutoff_len=0", "data.cutoff_len"),
    ("data.max_images_per_row=-1", "data.max_images_per_row"),
    ("mesh.shape.fsdp=0", "mesh.shape"),
])
def test_every_bad_config_value_is_one_line_naming_its_key_before_anything_is_written(
    offline_dataset, tmp_path, capsys, override, key):
  assert train_cli.main(_argv(tmp_path / "w", offline_dataset, f"--config.{override}")) == 2
  assert key in _one_line(capsys)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, key", [("lora.rank=0", "lora.rank"), ("lora.alpha=-1", "lora.alpha")])
def test_lora_values_are_checked_for_a_lora_run(offline_dataset, tmp_path, capsys, override, key):
  argv = _argv(tmp_path / "w", offline_dataset, f"--config.{override}")
  argv[1] = "--config=configs/tiny.py:lora"
  assert train_cli.main(argv) == 2
  assert key in _one_line(capsys)


def test_missing_config_file_is_one_line(tmp_path, capsys):
  assert train_cli.main(["train", "--config=configs/no_such.py", f"--workdir={tmp_path}"]) == 2
  assert "configs/no_such.py does not exist" in _one_line(capsys)


def test_workdir_that_is_a_file_is_one_line(offline_dataset, tmp_path, capsys):
  (tmp_path / "w").write_text("not a folder")
  assert train_cli.main(_argv(tmp_path / "w", offline_dataset)) == 2
  assert "--workdir" in _one_line(capsys)


def test_read_only_workdir_is_one_line_for_an_unprivileged_user(offline_dataset, tmp_path):
  workdir = tmp_path / "readonly"
  workdir.mkdir()
  os.chmod(workdir, 0o555)
  open_up(workdir)
  open_up(offline_dataset)
  done = python_unprivileged(["facellm_jax.train", *_argv(workdir, offline_dataset)[1:]], home=tmp_path / "home",
                             cwd=ROOT, timeout=300)
  err = done.stderr.strip()
  assert done.returncode == 2 and len(err.splitlines()) == 1, err
  assert err.startswith("error: --workdir") and "not writable" in err
  assert not any(workdir.iterdir())


def test_unwritable_outputs_of_evaluate_and_export_are_caught_before_anything_is_written(
    lora_workdir, tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o555)
  writable = tmp_path / "writable"
  writable.mkdir()
  give_away(writable)
  bench = write_benchmark(tmp_path / "bench")
  home = tmp_path / "home"
  cases = {
      "--out": ["facellm_jax.export", "--workdir", str(lora_workdir), "--out", str(locked / "hf")],
      "--orbax": ["facellm_jax.export", "--workdir", str(lora_workdir), "--out", str(writable / "hf"),
                  "--orbax", str(locked / "orbax")],
      "evaluate --out": ["facellm_jax.evaluate", "--workdir", str(lora_workdir), "--facexbench", str(bench),
                         "--out", str(locked / "r.json")],
  }
  for flag, args in cases.items():
    for p in (locked, writable, bench, lora_workdir):
      open_up(p)  # again each time: another pytest session may close the shared tmp root meanwhile
    done = python_unprivileged(args, home=home, cwd=ROOT, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, (flag, err)
    assert f"error: {flag.split()[-1]}" in err and "not writable" in err, err
  assert not any(writable.iterdir()) and not any(locked.iterdir())  # the HF folder was never started


def test_evaluate_of_a_step_that_does_not_exist_writes_nothing(lora_workdir, tmp_path, capsys):
  bench = write_benchmark(tmp_path / "bench")
  out = tmp_path / "eval/report.json"
  argv = ["--workdir", str(lora_workdir), "--facexbench", str(bench), "--out", str(out), "--step", "7"]
  assert evaluate.main(argv) == 2
  assert "--step 7" in _one_line(capsys)
  assert not out.parent.exists()


def _corrupt_middle(shard: pathlib.Path) -> None:
  data = bytearray(shard.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(4096)
  shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, named", [
    (lambda ds: (ds / "dataset_info.json").write_text("{broken"), "dataset_info.json is damaged"),
    (lambda ds: _truncate(next(ds.glob("data-*/*array_record*"))), "is damaged"),
    (lambda ds: _corrupt_middle(next(ds.glob("data-*/*array_record*"))), "cannot be read"),
])
def test_corrupted_dataset_is_one_line_and_leaves_no_temporary_folder(
    offline_dataset, tmp_path, capsys, damage, named):
  dataset = tmp_path / "ds"
  shutil.copytree(offline_dataset, dataset)
  damage(dataset)
  temp_before = set(os.listdir(tempfile.gettempdir()))
  assert train_cli.main(_argv(tmp_path / "w", dataset)) == 2
  assert named in _one_line(capsys)
  assert [p.name for p in (tmp_path / "w").iterdir()] in ([], ["checkpoints"]) if (tmp_path / "w").exists() else True
  leftover = {n for n in set(os.listdir(tempfile.gettempdir())) - temp_before if n.startswith("facellm-")}
  assert not leftover
