"""Several processes (hosts) answering one benchmark together, as multi-host training runs.

Each process holds its own replica of the model on its own devices (`load.inference_mesh`), so
generation never talks across hosts. The processes walk the same global batches of questions in
the same order; process i answers the i-th slice of each, and the answers are all-gathered
(`multihost_utils.process_allgather`, a few bytes per question) so process 0 can write the one
`predictions.jsonl` and report. What is already answered comes from process 0's view of `--out`
and is broadcast, so every process agrees on the work left even where `--out` is local to host 0.
Start them like training: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
(or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables), or
`--distributed` on TPU pods and SLURM.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                      help="host:port of process 0, for multi-process runs")
  parser.add_argument("--num_processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                      help="number of processes in a multi-process run")
  parser.add_argument("--process_id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", "0")),
                      help="this process's index in a multi-process run")
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")


def initialize(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` as `python -m facellm_jax.train` calls it (gloo collectives on CPU)."""
  if args.coordinator_address and args.num_processes > 1:
    if not 0 <= args.process_id < args.num_processes:
      raise ValueError(f"--process_id={args.process_id} must be in [0, {args.num_processes})")
    if os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def is_writer() -> bool:
  """Only process 0 writes shared files."""
  return jax.process_index() == 0


def broadcast_mask(mask: Sequence[bool]) -> np.ndarray:
  """Process 0's boolean mask, on every process."""
  mask = np.asarray(mask, bool)
  if jax.process_count() == 1:
    return mask
  return np.asarray(multihost_utils.broadcast_one_to_all(mask.astype(np.int32))).astype(bool)


def gather(values: list) -> list[list]:
  """Every process's JSON-serializable list, in process order, on every process."""
  if jax.process_count() == 1:
    return [values]
  data = np.frombuffer(json.dumps(values).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(row[:n].tobytes().decode()) for row, n in zip(everyone, sizes)]


def sliced(generate_fn: Callable[[list[T]], list[str]], per_process: int) -> Callable[[list[T]], list[str]]:
  """A generate_fn for global batches of `per_process` x processes prompts: this process answers
  its slice with `generate_fn`, and every process returns all the answers in order."""
  if jax.process_count() == 1:
    return generate_fn

  def fn(prompts: list[T]) -> list[str]:
    start = jax.process_index() * per_process
    mine = prompts[start:start + per_process]
    return [a for part in gather(generate_fn(mine) if mine else []) for a in part]

  return fn
