"""Orbax checkpoints of a training run: trainable params, optimizer state, step, data position.

One `CheckpointManager` step directory holds four items, written together and committed
atomically by Orbax (a step without its commit marker is never restored):
  params     the trainable parameters only (the adapters of a LoRA run; everything for a full
             run): frozen weights are re-derived from the HF checkpoint / seed on every start.
  opt_state  the optimizer (its step count and moments), trainable params only.
  data       each process's Grain iterator state, `process_<i>-of-<n>.json` (Grain's handler).
  meta       step, the model config and what trains: a restore into a different model fails
             with a readable message instead of a shape error deep inside Orbax.
Saves are asynchronous: the arrays are copied off the device before `save` returns and written
in the background while training continues.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import grain.checkpoint  # noqa: F401  (registers Grain's Orbax handler and its args)
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model or trainable set."""


class _StateSnapshot:
  """The iterator state captured when `save` is called; the background write must not see later
  batches (Grain's handler calls `get_state()` and, for non-Dataset iterators, decodes bytes)."""

  def __init__(self, state: Any):
    self._json = json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._json



class Checkpointer:
  """Saves every `every_steps` steps (and on `force`), keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int,
               meta: Mapping[str, Any], async_save: bool = True):
    if every_steps < 1 or keep < 1:
      raise ValueError(f"checkpoint.every_steps and checkpoint.keep must be >= 1, got {every_steps}, {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every_steps = every_steps
    self.meta = json.loads(json.dumps(dict(meta)))  # plain JSON types, comparable to a reload.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("params", "opt_state", "data", "meta"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, opt_state: Any, data_state: Any, *, force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`); True if one started."""
    if not force and step % self.every_steps:
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

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any,
              iterator: grain.DatasetIterator) -> tuple[Any, Any]:
    """Params and optimizer state restored straight into their target shardings (the abstract
    trees carry `jax.ShapeDtypeStruct(..., sharding=...)`); the iterator is moved in place."""
    self.check_meta(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["params"], restored["opt_state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _short(value: Any, limit: int = 160) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= limit else text[:limit] + "..."
