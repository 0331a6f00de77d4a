"""host_memory: on a CPU run a freed step buffer stays mapped, so the next step faults no pages in."""

import os
import subprocess
import sys

import pytest

from facellm_jax import host_memory

# What XLA:CPU does each step: a worker thread allocates one big temporary buffer, writes it, frees
# it. Counted: the page faults of the second and third rounds.
_PROGRAM = """
import ctypes, resource, sys, threading
from facellm_jax import host_memory
if sys.argv[1] == "late":  # JAX's CPU client already running: too late, nothing is changed
  import jax
  jax.devices()
took = host_memory.keep_freed_pages() if sys.argv[1] in ("keep", "late") else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def step():
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(buffer)
faults = []
def worker():
  step()
  before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
  step(); step()
  faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=worker)
thread.start(); thread.join()
print(took, faults[0])
"""


def _faults(mode: str) -> tuple[bool, int]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_pages_are_not_faulted_in_again_on_the_next_call():
  took, kept = _faults("keep")
  _, default = _faults("default")
  late, after_jax = _faults("late")
  assert took and not late
  assert default > 2 * 60_000  # each round faults the buffer's 65,536 pages in again
  assert kept < 1_000
  assert after_jax > 2 * 60_000


def test_only_where_jax_runs_on_the_cpu(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.jax_runs_on_cpu()
  assert not host_memory.keep_freed_pages()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.jax_runs_on_cpu()
