"""CPU runs: keep freed host memory mapped, so that each step does not fault its buffers in again.

XLA:CPU gives an executable's temporaries one buffer per run (1.5 GB for the train step of
benchmarks/vs_transformers.py). glibc serves an allocation that large from the calling thread's
arena with mmap and unmaps it when freed, so every step faulted some 400,000 fresh pages in: 0.17 s
of a 2.3 s step on a 2-core Xeon. With one arena, no mmap and no trimming, the freed buffer stays
in the heap and the next step reuses it: no faults, the step 7% faster (benchmarks/README.md,
vs_transformers). The price is that the process keeps its peak heap until it exits, which a
training or benchmark process does anyway; so it is only done where JAX will run on the CPU.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters
_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")  # TPU, TPU VM, GPU


def jax_runs_on_cpu() -> bool:
  """Whether JAX will pick the CPU, told without starting it: `JAX_PLATFORMS` says so, or the
  machine has no TPU or GPU device node."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def _jax_cpu_client_started() -> bool:
  """Whether this process already runs XLA:CPU's thread pool (its threads are named tf_XLA...)."""
  for comm in glob.glob("/proc/self/task/*/comm"):
    try:
      with open(comm) as f:
        if f.read().startswith("tf_XLA"):
          return True
    except OSError:  # the thread has exited
      continue
  return False


def keep_freed_pages() -> bool:
  """Tells glibc's malloc to keep freed memory for reuse; returns whether it did.

  Only before JAX starts its CPU client (the first `jax.devices()` or computation): a thread keeps
  the arena of its first allocation, so later it would change nothing but the rest of the process
  (a test worker calling a CLI's main, say). A no-op off Linux/glibc or where JAX runs on an
  accelerator.
  """
  if not sys.platform.startswith("linux") or not jax_runs_on_cpu() or _jax_cpu_client_started():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
