"""Shared test setup (must run before any jax import) and session-wide fixtures.

- 8 fake CPU devices for the sharding tests.
- numpy's transparent-huge-page advice off: on the CI's VMs the first touch of a fresh huge page
  is slow (tests/test_synth.py's probe, numpy-bound: 75 s with it, 39 s without; sys 30 -> 6 s).
- One persistent XLA compilation cache for the whole session, inherited by the subprocesses the
  tests start (train CLI, data_gen), so each distinct program compiles about once.
- One small offline-generated dataset and one tiny trained LoRA run, shared by every test file.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")  # read when numpy is imported: before any test
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="facellm_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402

import tiny_runs  # noqa: E402


@pytest.fixture(scope="session")
def offline_dataset(tmp_path_factory):
  """A TFDS QA dataset from `data_gen synth` (40 faces) + `data_gen generate --backend offline`."""
  return tiny_runs.offline_dataset(tmp_path_factory.mktemp("offline_dataset"))


@pytest.fixture(scope="session")
def lora_workdir(tmp_path_factory, offline_dataset):
  """A tiny LoRA run (3 steps, learning rate 1e-2 so the adapters matter), trained once per session."""
  return tiny_runs.trained_run(tmp_path_factory, offline_dataset, "lora").workdir
