"""Orbax checkpoints of a training run: trainable params, optimizer state, step, data position.

One `CheckpointManager` step directory holds four items, written together and committed by
Orbax (a step without its commit marker, e.g. one a kill interrupted, is never restored; on GCS
the marker is `commit_success.txt`, written last, since there is no atomic folder rename):
  params     the trainable parameters only (the adapters of a LoRA run; everything for a full
             run): frozen weights are re-derived from the HF checkpoint / seed on every start.
  opt_state  the optimizer (its step count and moments), trainable params only.
  data       each process's Grain iterator state, `process_<i>-of-<n>.json` (Grain's handler).
  meta       step, the model config and what trains: a restore into a different model fails
             with a readable message instead of a shape error deep inside Orbax.
Saves are asynchronous: the arrays are copied off the device before `save` returns and written
in the background while training continues.

A committed step can still be damaged later (a truncated file, a corrupt JSON). Every restore,
in training and inference alike, goes through `restore_first_intact`: it checks the step's JSON
files, tries the restore, and on damage reports the step and the file in one line and goes on
to the next older step; training also sets the damaged step aside (`7` -> `7.damaged-<time>`),
so it is neither restored again nor overwritten, and nothing is deleted.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grain
import grain.checkpoint  # noqa: F401  (registers Grain's Orbax handler and its args)
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from facellm_jax import paths

T = TypeVar("T")

# Tensorstore status codes: what a damaged file gives, and what an access problem gives (which
# must never get a good checkpoint set aside).
_DAMAGE_CODES = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT")
_ACCESS_CODES = ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                 "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED")
_STATUS = re.compile(r"\b(" + "|".join(_DAMAGE_CODES) + r"): (.*?)(?: \[[a-z_]+=|$)", re.DOTALL)
# The JSON files a restore reads: our meta, Grain's iterator states, Orbax's tree metadata.
_JSON_NAMES = ("metadata", "_METADATA")


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model or trainable set."""


class DamagedCheckpointError(ValueError):
  """No step that was tried could be restored: each one's files are damaged."""


class _StateSnapshot:
  """The iterator state captured when `save` is called; the background write must not see later
  batches (Grain's handler calls `get_state()` and, for non-Dataset iterators, decodes bytes)."""

  def __init__(self, state: Any):
    self._json = json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._json


def damaged_json(step_dir: epath.Path) -> str | None:
  """The first JSON file of a step that does not parse, as 'FILE is not valid JSON (...)'."""
  for f in sorted(paths.files_under(step_dir), key=str):
    if f.name.endswith(".json") or f.name in _JSON_NAMES:
      try:
        json.loads(f.read_bytes())
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{f} is not valid JSON ({getattr(e, 'msg', e)})"
  return None


def describe_damage(error: BaseException) -> str | None:
  """What is damaged, in one line, when `error` says a checkpoint's files are unreadable; None
  when it says something else (no access, a mismatch, a bug), which must not count as damage."""
  chain, e = [], error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  if any(isinstance(c, (CheckpointMismatchError, PermissionError, ConnectionError, TimeoutError))
         or any(code in str(c) for code in _ACCESS_CODES) for c in chain):
    return None
  for c in chain:
    if isinstance(c, (json.JSONDecodeError, UnicodeDecodeError)):
      return f"invalid JSON ({getattr(c, 'msg', c)})"
    if isinstance(c, FileNotFoundError):
      return f"a file is missing ({paths.one_line(c, 200)})"
    match = _STATUS.search(str(c))
    if match:
      return paths.one_line(f"{match.group(1)}: {match.group(2)}", 300)
  return None


def _everywhere(ok: bool) -> bool:
  """True when `ok` on every process: all of them restore the same step or none does."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def restore_first_intact(directory: epath.Path, steps: Sequence[int], attempt: Callable[[int], T], *,
                         set_aside: bool) -> tuple[int, T]:
  """`(step, attempt(step))` for the newest step whose files are intact, trying older ones in turn.

  Each damaged step is reported on stderr in one line naming the step and what is damaged (and,
  with `set_aside`, renamed out of the way by process 0). Raises `DamagedCheckpointError` when
  every step is damaged; any other error of `attempt` (a mismatch, no access) goes through.
  """
  steps = sorted(steps, reverse=True)
  for i, step in enumerate(steps):
    step_dir = directory / str(step)
    problem = damaged_json(step_dir)
    result = None
    if problem is None:
      try:
        result = attempt(step)
      except Exception as e:  # pylint: disable=broad-except  (classified just below)
        problem = describe_damage(e)
        if problem is None:
          raise
    if _everywhere(problem is None):
      return step, result
    problem = problem or "damaged as another process reads it"
    moved = ""
    if set_aside and jax.process_index() == 0:
      moved = f"; set aside as {paths.set_aside(step_dir, 'damaged').name}"
    if set_aside and jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    message = f"checkpoint step {step} in {directory} is damaged: {problem}{moved}"
    if i + 1 == len(steps):
      raise DamagedCheckpointError(f"{message}; no intact checkpoint is left")
    if jax.process_index() == 0:
      print(f"warning: {message}; falling back to step {steps[i + 1]}", file=sys.stderr, flush=True)
  raise DamagedCheckpointError(f"no checkpoint in {directory}")


class Checkpointer:
  """Saves every `every_steps` steps (and on `force`), keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int,
               meta: Mapping[str, Any], async_save: bool = True):
    if every_steps < 1 or keep < 1:
      raise ValueError(f"checkpoint.every_steps and checkpoint.keep must be >= 1, got {every_steps}, {keep}")
    self.directory = paths.path(directory)
    self.every_steps = every_steps
    self.meta = json.loads(json.dumps(dict(meta)))  # plain JSON types, comparable to a reload.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("params", "opt_state", "data", "meta"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step)` saves without `force`: callers skip building its state dicts if not."""
    return step % self.every_steps == 0

  def save(self, step: int, params: Any, opt_state: Any, data_state: Any, *, force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`); True if one started."""
    if not force and not self.due(step):
      return False
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(_StateSnapshot(data_state)),
        meta=ocp.args.JsonSave({**self.meta, "step": step}))
    return self.manager.save(step, args=args, force=True)

  def check_meta(self, step: int) -> None:
    found = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    found = {k: v for k, v in found.items() if k != "step"}
    if found != self.meta:
      diff = sorted(k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k))
      details = "; ".join(f"{k}: checkpoint {_short(found.get(k))} vs config {_short(self.meta.get(k))}"
                          for k in diff)
      raise CheckpointMismatchError(
          f"the checkpoint at {self.directory}/{step} is from a different run setup ({details}); "
          "use a fresh --workdir or the config it was trained with")

  def _first_intact(self, attempt: Callable[[int], T]) -> tuple[int, T] | None:
    steps = self.manager.all_steps()
    if not steps:
      return None
    try:
      return restore_first_intact(self.directory, steps, attempt, set_aside=True)
    except DamagedCheckpointError as e:
      if jax.process_index() == 0:
        print(f"warning: {e}; training starts from step 0", file=sys.stderr, flush=True)
      return None
    finally:
      self.manager.reload()  # forget the steps set aside

  def latest_setup_step(self) -> int | None:
    """The newest step whose metadata reads and matches this run's setup (a mismatch raises
    `CheckpointMismatchError`); damaged steps met on the way are set aside."""
    found = self._first_intact(self.check_meta)
    return None if found is None else found[0]

  def restore(self, abstract_params: Any, abstract_opt_state: Any,
              iterator: grain.DatasetIterator) -> tuple[int, Any, Any] | None:
    """(step, params, optimizer state) of the newest intact step, restored straight into their
    target shardings (the abstract trees carry `jax.ShapeDtypeStruct(..., sharding=...)`); the
    iterator is moved in place. None when there is no intact checkpoint."""
    initial = iterator.get_state()

    def attempt(step: int):
      self.check_meta(step)
      try:
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=grain.checkpoint.CheckpointRestore(iterator)))
      except BaseException:
        iterator.set_state(initial)  # a half-restored position must not leak into the next try
        raise

    found = self._first_intact(attempt)
    if found is None:
      return None
    step, restored = found
    return step, restored["params"], restored["opt_state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _short(value: Any, limit: int = 160) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= limit else text[:limit] + "..."
