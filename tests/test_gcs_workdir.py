"""gs:// workdirs end to end, against a real GCS JSON-API server reachable only on loopback.

One `tests/gcs_driver.py` run inside `unshare -n` (a network namespace whose only interface is
lo) does the storage work; these tests check what it found and what it copied back.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from facellm_jax import evaluate as evaluate_cli
from facellm_jax.inference import load
from gcs_driver import EVERY, STEPS
from test_evaluate_cli import write_benchmark
from test_summaries import read_scalars

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unshare_refused() -> str | None:
  try:
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=30)
  except FileNotFoundError:
    return "util-linux's unshare is not installed"
  return None if done.returncode == 0 else f"unshare -n is refused here ({done.stderr.strip()})"


@pytest.fixture(scope="module")
def gcs(offline_dataset, tmp_path_factory):
  reason = _unshare_refused()
  if reason:
    pytest.skip(f"needs a network namespace with only loopback for the GCS emulator: {reason}")
  out = tmp_path_factory.mktemp("gcs")
  bench = write_benchmark(tmp_path_factory.mktemp("gcs_bench"))
  done = subprocess.run(["unshare", "-n", sys.executable, "tests/gcs_driver.py", str(out), str(offline_dataset),
                         str(bench)], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  print({k: round(v, 1) for k, v in results.items() if k.startswith("t_")})
  return results, out, bench


def _losses(records):
  return {m["step"]: m["loss"] for m in records}


def test_run_killed_on_gcs_resumes_with_the_losses_of_an_uninterrupted_local_run(gcs):
  r, out, _ = gcs
  steps = list(range(1, STEPS + 1))
  assert r["local_rc"] == 0 and [m["step"] for m in r["local"]] == steps
  assert r["killed_rc"] == -9 and f"{EVERY}+" in r["killed_checkpoints"], r["killed_checkpoints"]
  assert str(2 * EVERY) in r["half_written"]  # present without its commit marker
  assert r["rerun_rc"] == 0
  assert [m["step"] for m in r["gcs"]] == steps  # every step once: none lost, none repeated
  assert _losses(r["gcs"]) == _losses(r["local"])
  assert set(r["gcs_checkpoints"]) == {f"{STEPS - EVERY}+", f"{STEPS}+"}  # the half-written one was written anew
  assert {"config.json", "metrics.jsonl", "tokenizer", "checkpoints", "tensorboard"} <= set(r["gcs_files"])
  assert "tokenizer.json" in r["tokenizer_files"] and r["tensorboard_files"] >= 2  # the killed run's, the rerun's
  # What the killed run logged past its checkpoint is purged: TensorBoard shows each step once.
  assert read_scalars(out / "tensorboard_copy", "train/loss") == [(m["step"], m["loss"]) for m in r["gcs"]]


def test_export_from_gcs_to_gcs_loads_in_transformers_with_the_trained_weights(gcs):
  from transformers import InternVLForConditionalGeneration

  r, out, _ = gcs
  assert r["export_rc"] == [0, ""]
  saved = np.load(out / "orbax_logits.npz")
  ids, pixels = saved["ids"], saved["pixels"]
  ours = np.asarray(load.load_for_inference(out / "local")[0](ids[None], pixels))  # the local run's weights
  hf_model = InternVLForConditionalGeneration.from_pretrained(out / "hf_copy").eval()
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids[None], dtype=torch.long),
                      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # The Orbax export, restored from gs://: the same weights. The driver ran on one device, this process
  # shards over its 8 fake ones by default, so the sums differ by rounding only (~5e-7 seen).
  np.testing.assert_allclose(saved["logits"], ours, atol=1e-5, rtol=0)


def test_evaluate_of_a_gcs_workdir_into_gcs_matches_the_local_evaluation(gcs, tmp_path):
  r, out, bench = gcs
  assert r["eval_rc"][0] == 0 and r["eval_rerun_rc"][0] == 0
  predictions = [json.loads(line) for line in (out / "eval_copy/predictions.jsonl").read_text().splitlines()]
  assert len(predictions) == len({p["qid"] for p in predictions}) == 5  # the rerun answered nothing twice
  run = json.loads((out / "eval_copy/evaluation_run.json").read_text())
  assert run["model"] == {"workdir": "gs://bkt/run", "step": STEPS}
  local = tmp_path / "report.json"
  assert evaluate_cli.main(["--workdir", str(out / "local"), "--facexbench", str(bench), "--out", str(local),
                            "--batch_size", "2", "--max_new_tokens", "4"]) == 0
  local_predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  assert {p["qid"]: p["prediction"] for p in predictions} == {p["qid"]: p["prediction"] for p in local_predictions}
  gcs_report, local_report = (json.loads(p.read_text()) for p in (out / "eval_copy/report.json", local))
  assert gcs_report["per_task"] == local_report["per_task"] and gcs_report["total_questions"] == 5


def test_damaged_checkpoint_on_gcs_is_set_aside_and_training_falls_back(gcs):
  r, _, _ = gcs
  code, err = r["damaged_rc"]
  assert code == 0
  warning = [line for line in err.splitlines() if line.startswith("warning: ")]
  assert len(warning) == 1 and f"checkpoint step {STEPS} " in warning[0] and "OUT_OF_RANGE" in warning[0]
  assert f"falling back to step {STEPS - EVERY}" in warning[0] and f"set aside as {STEPS}.damaged-" in warning[0]
  assert [m["step"] for m in r["damaged_metrics"]] == list(range(1, STEPS + 1))
  assert _losses(r["damaged_metrics"]) == _losses(r["local"])
  assert f"{STEPS}+" in r["damaged_checkpoints"]  # trained again and saved
  aside = [c for c in r["damaged_checkpoints"] if c.startswith(f"{STEPS}.damaged-")]
  assert len(aside) == 1 and aside[0].endswith("+")  # kept whole, commit marker included


def test_two_processes_train_one_gcs_workdir(gcs):
  r, _, _ = gcs
  assert r["two_rc"] == [0, 0]
  assert [m["step"] for m in r["two"]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([m["loss"] for m in r["two"]], [m["loss"] for m in r["local"]], rtol=1e-4)


@pytest.mark.parametrize("case, expected", [
    ("train_missing_bucket", "bucket gs://missing does not exist"),
    ("export_missing_bucket", "bucket gs://missing does not exist"),
    ("evaluate_missing_bucket", "bucket gs://missing does not exist"),
    ("dataset_on_gcs", "must be a local path"),
    ("train_denied", "permission denied"),
    ("export_denied", "permission denied"),
    ("evaluate_denied", "permission denied"),
])
def test_bad_gcs_paths_are_one_line_errors_that_create_nothing(gcs, case, expected):
  r, _, _ = gcs
  code, err = r["bad"][case]
  assert code == 2 and err.startswith("error: ") and "\n" not in err and expected in err, err
  assert r["buckets"] == ["bkt"]  # no bucket was created for a missing one
  assert r["objects_written_by_bad_input"] == []
