"""What every benchmark reports the same way: the machine, interleaved timings, memory.

Timings alternate the contenders (ours, theirs, ours, theirs, ...) after a warm-up call of each,
so a noisy neighbour on a shared machine slows both sides alike, and report medians. Host memory
comes from sampling this process's resident set size while a call runs (after handing freed heap
back to the OS), because on CPU neither XLA nor torch exposes an allocator peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def cpu_threads() -> int:
  """Cores this process may run on: what XLA's CPU thread pool uses, and what torch gets too."""
  return len(os.sched_getaffinity(0))


def machine() -> dict[str, Any]:
  """CPU model, cores, memory, load and date, for the results table."""
  model = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  mem_gb = os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**30
  return {"cpu": f"{platform.machine()} {model}", "cores": cpu_threads(), "memory_gb": round(mem_gb, 1),
          "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
          "date": datetime.date.today().isoformat()}


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * _PAGE


def peak_rss_mb() -> float:
  """The whole process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _trim_heap() -> None:
  """Returns freed malloc memory to the OS so the next call's growth shows up in RSS."""
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
  """Peak RSS while the block runs, sampled every `interval` s; `.growth` is above the start."""

  def __init__(self, interval: float = 0.002):
    self.interval, self.start, self.peak = interval, 0, 0
    self._stop = threading.Event()

  def _sample(self) -> None:
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(self.interval)

  def __enter__(self) -> RssPeak:
    _trim_heap()
    self.start = self.peak = rss_bytes()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())

  @property
  def growth(self) -> int:
    return self.peak - self.start


def interleaved(contenders: Mapping[str, Callable[[], Any]], *, repeats: int,
                warmup: int = 1) -> dict[str, dict[str, Any]]:
  """Runs each contender `warmup` times untimed, once more for memory and once more untimed, then
  `repeats` rounds alternating them, timed.

  Every callable must block until its work is done (e.g. `jax.block_until_ready`). Returns per
  contender the median and all times (s), and the RSS growth and absolute RSS of its memory call
  (MB). Memory is sampled on a call of its own (the heap trimmed first, so its growth shows): a
  sampling thread and a trimmed heap would slow the timed calls, whose freed pages a training
  process keeps for reuse (`facellm_jax.host_memory`); the untimed call after it faults the
  trimmed pages back in, so the first timed round is not the slow one.
  """
  for _ in range(warmup):
    for fn in contenders.values():
      fn()
  growth, peak = {}, {}
  for name, fn in contenders.items():
    with RssPeak() as rss:
      fn()
    growth[name], peak[name] = rss.growth, rss.peak
  for fn in contenders.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: {"median_s": statistics.median(t), "times_s": [round(x, 4) for x in t],
                 "rss_growth_mb": round(growth[name] / MB, 1), "rss_peak_mb": round(peak[name] / MB, 1)}
          for name, t in times.items()}


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
  """Prints what is running and how long it took, so long runs show where they are."""
  start = time.perf_counter()
  print(f"[{message}] ...", flush=True)
  yield
  print(f"[{message}] {time.perf_counter() - start:.1f} s", flush=True)
