"""`facellm-demo --smoke` with a gs:// workdir, against the GCS emulator of `tests/gcs_driver.py`.

`tests/test_demo.py` runs `unshare -n python tests/demo_gcs_driver.py OUT SMOKE` (a network
namespace with only loopback, as gcs_driver's own scenarios). Inside: the demo runs twice on
`gs://bkt/demo` (the second run must resume, training nothing), a bad seed and a workdir in a
bucket that denies writes are tried, and OUT/results.json records what the bucket and the local
scratch folder hold. SMOKE, a local `--smoke` workdir, seeds the scratch folder with its local
stages (faces to pretraining), as a rerun on the same machine finds them: what the bucket adds
is tested, and the suite does not pretrain twice. The parent's XLA_FLAGS (its device count) are
kept, so the programs the parent compiled come from the shared compilation cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gcs_driver import BUCKET, DENY_PORT, PORT, ROOT, gcs_env, isolate, quietly, run_with_servers  # pylint: disable=wrong-import-position


LOCAL_STAGES = ("faces", "benchmark", "qa", "data", "cards", "tokenizer", "vision", "pretrain")


def seed_scratch(smoke: pathlib.Path, scratch: pathlib.Path) -> None:
  """Copies a local smoke workdir's scratch stages where the gs:// run looks for them."""
  for name in LOCAL_STAGES:
    shutil.copytree(smoke / name, scratch / name)
  config = scratch / "pretrain" / "config.json"  # the pretraining's paths, as if made here
  config.write_text(config.read_text().replace(str(smoke), str(scratch)))


def scenarios(smoke: pathlib.Path) -> dict:
  from facellm_jax import demo, paths  # pylint: disable=g-import-not-at-top

  workdir = f"gs://{BUCKET}/demo"
  seed_scratch(smoke, demo.scratch_dir(paths.path(workdir)))
  r = {}
  r["rc"], r["err"] = quietly(demo.main, ["--workdir", workdir, "--smoke"])
  r["objects"] = sorted(os.fspath(p)[len(workdir) + 1:] for p in paths.files_under(workdir))
  r["report"] = json.loads(paths.path(f"{workdir}/{demo.REPORT_FILE}").read_text())
  scratch = demo.scratch_dir(paths.path(workdir))
  r["scratch"] = str(scratch)
  r["scratch_entries"] = sorted(p.name for p in scratch.iterdir())
  r["png_head"] = paths.path(f"{workdir}/{demo.PICTURE_FILE}").read_bytes()[:8].hex()
  metrics = paths.path(f"{workdir}/train/metrics.jsonl").read_text()
  r["rerun_rc"], _ = quietly(demo.main, ["--workdir", workdir, "--smoke"])
  r["rerun_trained_nothing"] = paths.path(f"{workdir}/train/metrics.jsonl").read_text() == metrics
  try:
    quietly(demo.main, ["--workdir", workdir, "--smoke", "--seed", "-1"])
  except SystemExit as e:  # argparse's error: usage and one error line, exit 2
    r["bad_seed_rc"] = e.code
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{DENY_PORT}"  # every request: 403
  r["denied_rc"], r["denied_err"] = quietly(demo.main, ["--workdir", f"gs://{BUCKET}/other", "--smoke"])
  return r


def main(argv: list[str]) -> None:
  out, smoke = pathlib.Path(argv[1]), pathlib.Path(argv[2])
  isolate()
  os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  os.environ.update(gcs_env(PORT), CLOUDSDK_CONFIG=tempfile.mkdtemp(prefix="gcloud-empty-"),
                    JAX_PLATFORMS="cpu", TMPDIR=str(out / "tmp"))
  (out / "tmp").mkdir()
  tempfile.tempdir = None  # re-read TMPDIR: the local scratch folder lands under OUT
  os.chdir(ROOT)
  run_with_servers(out, lambda: scenarios(smoke))


if __name__ == "__main__":
  main(sys.argv)
