"""Small datasets and tiny trained runs shared by the training, evaluation, chat and export tests."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from facellm_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402  pylint: disable=wrong-import-position

_RUNS: dict = {}


def offline_dataset(root: pathlib.Path, num_faces: int = 40) -> pathlib.Path:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for cmd in (["synth", "--out", str(root / "synth"), "--num", str(num_faces), "--seed", "0"],
              ["generate", "--labels", str(root / "synth/labels.csv"), "--images", str(root / "synth"),
               "--out", str(root / "ds"), "--backend", "offline", "--no-progress"]):
    subprocess.run([sys.executable, "-m", "data_gen", *cmd], check=True, capture_output=True, env=env, cwd=ROOT)
  return root / "ds"


def trained_run(tmp_path_factory, dataset: pathlib.Path, variant: str = "lora",
                num_steps: int = 3, scan_layers: bool = False) -> loop.TrainResult:
  """A run of the tiny config (2 decoder layers); once per session, variant and layer layout.

  The result's `workdir` attribute is its workdir; `state` is what training ended with.
  """
  key = (variant, scan_layers)
  if key not in _RUNS:
    cfg = tiny.get_config(variant).unlock()
    cfg.data.dir = str(dataset)
    cfg.data.cutoff_len = 128
    cfg.model.text.num_hidden_layers = 2
    cfg.mesh.shape.data = 1
    cfg.train.update(num_steps=num_steps, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, log_every=1,
                     scan_layers=scan_layers)
    workdir = tmp_path_factory.mktemp(f"{variant}{'_scanned' if scan_layers else ''}_run")
    result = loop.train(cfg.lock(), workdir, show_progress=False, devices=jax.devices()[:1])
    result.workdir = workdir
    _RUNS[key] = result
  return _RUNS[key]


def face_png(path: pathlib.Path, seed: int) -> pathlib.Path:
  """A 16x16 random RGB PNG (the model resizes it to its 112 px)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)).save(path)
  return path
