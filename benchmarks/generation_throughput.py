"""Generation throughput: the OpenAI chat backend at concurrency N vs one request at a time.

A real API call spends most of its time waiting on the server, so requests in flight together
should scale almost linearly. Runs against the local fake OpenAI server (tests/fake_openai.py)
with a fixed latency per request; the goal (issue 3) is 200 requests at concurrency 32 finishing
>= 16x faster than serially at 0.3 s latency.

  python benchmarks/generation_throughput.py [--requests 200] [--concurrency 32] [--latency 0.3]
      [--serial-requests 200]

`--serial-requests` below `--requests` times a sample serially and scales it (stated in the
output); the default measures every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from data_gen.backends.openai_chat import OpenAIChatBackend  # noqa: E402
from fake_openai import Collector, FakeOpenAI, MemoryMeta, make_requests  # noqa: E402


def timed_run(fake: FakeOpenAI, requests, concurrency: int) -> float:
  backend = OpenAIChatBackend("gpt-4o-2024-11-20", fake.api_key, fake.base_url, concurrency)
  emit = Collector()
  start = time.perf_counter()
  asyncio.run(backend.run(requests, emit, MemoryMeta()))
  elapsed = time.perf_counter() - start
  failed = [r for r in emit.results.values() if r.status != "ok"]
  if len(emit.results) != len(requests) or failed:
    raise SystemExit(f"benchmark run incomplete: {len(emit.results)}/{len(requests)} results, "
                     f"{len(failed)} not ok")
  return elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--requests", type=int, default=200)
  parser.add_argument("--concurrency", type=int, default=32)
  parser.add_argument("--latency", type=float, default=0.3)
  parser.add_argument("--serial-requests", type=int, default=None)
  args = parser.parse_args()
  serial_n = min(args.serial_requests or args.requests, args.requests)
  with tempfile.TemporaryDirectory() as directory:
    requests = make_requests(directory, args.requests)
    with FakeOpenAI(latency=args.latency) as fake:
      parallel = timed_run(fake, requests, args.concurrency)
      serial_sample = timed_run(fake, requests[:serial_n], 1)
  serial = serial_sample * args.requests / serial_n
  report = {
      "requests": args.requests, "latency_s": args.latency, "concurrency": args.concurrency,
      "parallel_s": round(parallel, 2), "serial_s": round(serial, 2),
      "serial_measured_requests": serial_n, "speedup": round(serial / parallel, 1),
      "parallel_requests_per_s": round(args.requests / parallel, 1),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                 f"Python {platform.python_version()}",
  }
  scaled = "" if serial_n == args.requests else f" (scaled from {serial_n} measured)"
  print(f"{args.requests} requests, {args.latency}s latency: concurrency {args.concurrency} "
        f"{parallel:.2f}s, serial {serial:.2f}s{scaled} -> {serial / parallel:.1f}x "
        f"(goal >= 16x)")
  print(json.dumps(report))


if __name__ == "__main__":
  main()
