"""Compile-only: a config's real train step compiled for a TPU topology, on any machine with libtpu.

`python -m facellm_jax.train --config=... --workdir=W --compile_only --topology=v5p-8 [--find_max_batch]`

libtpu describes a TPU slice without one (`jax.experimental.topologies.get_topology_desc`); a
mesh over its abstract devices, the train state as `ShapeDtypeStruct`s (`nnx.eval_shape` of
the same model, optimizer and shardings the training loop builds) and the batch's shapes give
`jit(...).lower(...).compile()` of exactly `training/step.py`'s jitted step, donation included.
XLA's buffer assignment (`memory_analysis()`) then says what one chip needs and whether it fits
its HBM; its cost analysis, the FLOPs. Nothing is read (no weights, checkpoint or dataset; a
`model.hf_checkpoint`'s config.json only, for the architecture) and nothing is written.

Slice names follow Cloud TPU: `v5p-N` counts TensorCores (N/2 chips, one megacore device each),
`v5litepod-N` / `v5e-N` and `v6e-N` count chips; `KIND:AxB[xC]` names the chip grid directly.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax._src import config as jax_config  # the option's context manager (jax.config has only update)

from facellm_jax.models import lora as lora_lib
from facellm_jax.models import sharding
from facellm_jax.training import loop
from facellm_jax.training import step as step_lib
from facellm_jax.training import validate

GiB = 2**30
# Cloud TPU slice kind -> (libtpu's name, TensorCores per chip counted in slice names, grid rank).
_KINDS = {"v5p": ("v5p", 2, 3), "v5e": ("v5e", 1, 2), "v5litepod": ("v5e", 1, 2), "v6e": ("v6e", 1, 2)}
# HBM per chip XLA may use, by `device_kind` (abstract devices have no memory_stats): the
# "available HBM" its out-of-memory errors quote for these chips (v5e 16 GiB, v5p 96 GiB and v6e
# 32 GiB less what the runtime keeps).
HBM_BYTES = {"TPU v5 lite": int(15.75 * GiB), "TPU v5": int(95.74 * GiB), "TPU v6 lite": int(31.25 * GiB)}


class TopologyError(ValueError):
  """A topology name that is not a TPU slice we know, or no libtpu to describe it."""


def _grid(chips: int, rank: int) -> list[int]:
  """Cloud TPU's chip grid of a power-of-two slice: from 2x2(x1), double the last smallest axis."""
  dims = [2, 2] + [1] * (rank - 2)
  while math.prod(dims) < chips:
    i = max(j for j, d in enumerate(dims) if d == min(dims))
    dims[i] *= 2
  return dims


def topology_name(name: str) -> str:
  """`v5p-8` -> `v5p:2x2x1`, `v5litepod-16` -> `v5e:4x4`, `v6e-8` -> `v6e:2x4`; `v5p:2x2x1` is kept."""
  m = re.fullmatch(r"(v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", name.strip().lower())
  if not m:
    raise TopologyError(f"--topology={name!r}: expected a TPU slice such as v5p-8, v5litepod-16, v5e-16, v6e-8 "
                        "or a chip grid such as v5p:2x2x1, v5e:2x2")
  kind, sep, size = m.groups()
  libtpu_kind, cores, rank = _KINDS[kind]
  if sep == ":":
    dims = size.split("x")
    if len(dims) != rank or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise TopologyError(f"--topology={name!r}: a {kind} chip grid has {rank} positive sizes, e.g. "
                          f"{'x'.join(['2'] * rank)}")
    return f"{libtpu_kind}:{size}"
  if not size.isdigit() or int(size) % cores:
    raise TopologyError(f"--topology={name!r}: {kind}-N counts {'TensorCores (2 per chip)' if cores == 2 else 'chips'}")
  chips = int(size) // cores
  if chips == 1 and rank == 2:
    return f"{libtpu_kind}:1x1"
  if chips < 4 or chips & (chips - 1):
    raise TopologyError(f"--topology={name!r}: {chips} chips; slice names map to grids for 1 (v5e/v6e) or a power "
                        f"of two >= 4 chips; name other grids directly ({kind}:{'x'.join(['2'] * rank)} style)")
  return f"{libtpu_kind}:{'x'.join(map(str, _grid(chips, rank)))}"


def topology_devices(name: str) -> list[jax.Device]:
  """The abstract devices (one per chip) of TPU topology `name`; `TopologyError` without libtpu."""
  grid = topology_name(name)
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  # libtpu takes /tmp/libtpu_lockfile to own the local chips; any other jax process on the machine
  # that loaded it (a CPU run without JAX_PLATFORMS=cpu does) would then refuse us. No chip is used here.
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=grid).devices)
  except Exception as e:  # libtpu rejects the grid (an unsupported size): its message says why
    raise TopologyError(f"--topology={name!r} ({grid}): {str(e).splitlines()[0]}") from None


def abstract_batch(cfg: ml_collections.ConfigDict, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one step's global batch: `grad_accum` micro-batches of `rows` rows."""
  mc = loop.model_config(cfg)
  a, t, s = cfg.train.grad_accum, cfg.data.cutoff_len, mc.vision.image_size
  tokens = jax.ShapeDtypeStruct((a, rows, t), jnp.int32)
  return {"input_ids": tokens, "targets": tokens, "loss_mask": jax.ShapeDtypeStruct((a, rows, t), jnp.float32),
          "positions": tokens, "segment_ids": tokens, "num_images": jax.ShapeDtypeStruct((a, rows), jnp.int32),
          "pixel_values": jax.ShapeDtypeStruct((a, rows, loop.image_slots(cfg, mc), s, s, 3), jnp.float32)}


def lower_train_step(cfg: ml_collections.ConfigDict, devices: list[jax.Device], rows_per_chip: int):
  """`jit(step).lower(...)` of the loop's train step for `rows_per_chip` rows per data shard."""
  mesh = sharding.make_mesh(dict(cfg.mesh.shape), devices)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  mc = loop.model_config(cfg)
  no_weights = cfg.copy_and_resolve_references()
  with no_weights.unlocked():
    no_weights.model.hf_checkpoint = ""  # the architecture is in `mc`; random init is never run
  oc = loop.optim_config(cfg)
  wrt = lora_lib.trainable_filter(cfg.train.trainable)

  def build():
    model = loop.build_model(no_weights, mc, mesh)
    return model, nnx.Optimizer(model, step_lib.make_tx(oc), wrt=wrt)

  graphdef, state = nnx.split(nnx.eval_shape(build))
  state_sh = sharding.state_shardings(state, mesh)
  batch = abstract_batch(cfg, rows_per_chip * shards)
  batch_sh = step_lib.batch_shardings(mesh, batch)
  step = step_lib.make_train_step(graphdef, wrt, step_lib.learning_rate_schedule(oc),
                                  loss_chunk=cfg.train.loss_chunk)
  return step_lib.jit_train_step(step, state_sh, batch_sh, mesh).lower(state, batch), mesh


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "exceeds available" in text or "Ran out of memory" in text


def measure(cfg: ml_collections.ConfigDict, devices: list[jax.Device], rows_per_chip: int) -> dict[str, Any]:
  """Compiles at `rows_per_chip` and reports XLA's memory and cost analysis (see the module doc)."""
  kind = devices[0].device_kind
  hbm = HBM_BYTES.get(kind)
  start = time.perf_counter()
  lowered, mesh = lower_train_step(cfg, devices, rows_per_chip)
  out: dict[str, Any] = {"rows_per_chip": rows_per_chip}
  try:
    # A compile-only executable cannot be loaded back from a persistent compilation cache: skip it.
    with jax_config.enable_compilation_cache(False):
      compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if not _is_oom(e):
      raise
    message = next((line for line in str(e).splitlines() if "exceeds" in line or "memory" in line.lower()),
                   str(e).splitlines()[0])
    return {**out, "compile_s": round(time.perf_counter() - start, 1), "fits": False, "xla_message": message.strip()}
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  mc = loop.model_config(cfg)
  rows = rows_per_chip * mesh.shape["data"] * mesh.shape["fsdp"] * cfg.train.grad_accum
  flops = step_lib.train_flops_per_step(mc, rows=rows, seq_len=cfg.data.cutoff_len,
                                        images=rows * loop.image_slots(cfg, mc),
                                        trainable=cfg.train.trainable, lora=loop.lora_config(cfg))
  return {**out, "compile_s": round(time.perf_counter() - start, 1),
          "bytes_per_chip": {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                             "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes, "total": total},
          "gib_per_chip": round(total / GiB, 2), "fits": hbm is None or total <= hbm,
          "xla_flops_per_chip": cost.get("flops"), "model_flops_per_chip": flops / len(devices)}


def _with_rows(cfg: ml_collections.ConfigDict, rows_per_chip: int, shards: int) -> ml_collections.ConfigDict:
  out = cfg.copy_and_resolve_references()
  with out.unlocked():
    out.train.batch_size = rows_per_chip * shards * cfg.train.grad_accum
  return out


def find_max_batch(try_rows: Callable[[int], dict[str, Any]], *, hbm: float | None = None,
                   limit: int = 4096) -> tuple[int, list[dict[str, Any]]]:
  """Largest rows per chip that fit: doubling from 1, then bisection between the last fit and the first failure.

  Each try is a full compile (minutes for the real sizes), so once two tries fit, the next is
  the linear extrapolation of their `bytes_per_chip.total` to `hbm` instead of the next power
  of two (XLA's bytes grow about linearly in the rows); below a failed extrapolation the tries
  step down 1, 2, 4, ... rows until one fits, then bisect. Returns (best, every try in order);
  best is 0 when 1 does not fit.
  """
  tries: list[dict[str, Any]] = []
  fit: list[tuple[int, int]] = []  # (rows, total bytes) of the tries that fit
  fails, guessed, rows = None, False, 1
  while rows <= limit:
    tries.append(try_rows(rows))
    if not tries[-1]["fits"]:
      fails = rows
      break
    fit.append((rows, tries[-1].get("bytes_per_chip", {}).get("total", 0)))
    guessed, rows = False, rows * 2
    if hbm and len(fit) >= 2 and fit[-1][1] > fit[-2][1]:
      (r1, b1), (r2, b2) = fit[-2:]
      rows, guessed = max(r2 + 1, r2 + int((hbm - b2) // ((b2 - b1) / (r2 - r1)))), True
  best, step = (fit[-1][0] if fit else 0), 1
  while fails is not None and fails - best > 1 and best > 0:
    if guessed:  # below a missed extrapolation: 1, 2, 4, ... rows down until one fits
      mid, step = max(best + 1, fails - step), step * 2
    else:
      mid = (best + fails) // 2
    tries.append(try_rows(mid))
    if tries[-1]["fits"]:
      best, guessed = mid, False
    else:
      fails = mid
  return best, tries


def run(cfg: ml_collections.ConfigDict, topology: str, *, search: bool = False,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
  """The compile-only report: one compile at the config's batch, or the `search` for the largest."""
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(dict(cfg.mesh.shape), devices)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  problem = validate.batch_split_problem(cfg.train.batch_size, cfg.train.grad_accum, shards)
  if not search and problem:
    raise loop.ConfigError(problem)
  micro = cfg.train.batch_size // cfg.train.grad_accum
  report = {"topology": topology, "libtpu_topology": topology_name(topology), "chips": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "seq_len": cfg.data.cutoff_len,
            "grad_accum": cfg.train.grad_accum, "trainable": cfg.train.trainable,
            "hbm_per_chip": HBM_BYTES.get(devices[0].device_kind)}

  def one(rows: int) -> dict[str, Any]:
    result = measure(_with_rows(cfg, rows, shards), devices, rows)
    state = f"{result['gib_per_chip']} GiB" if "gib_per_chip" in result else "out of memory at compile"
    log(f"[compile_only] {rows} rows/chip: {state}, fits={result['fits']} ({result['compile_s']} s)")
    return result

  if not search:
    return {**report, **one(micro // shards)}
  best, tries = find_max_batch(one, hbm=report["hbm_per_chip"])
  chosen = next((t for t in reversed(tries) if t["rows_per_chip"] == best), tries[0])
  return {**report, **chosen, "max_rows_per_chip": best,
          "tries": [{k: t.get(k) for k in ("rows_per_chip", "fits", "gib_per_chip", "compile_s")} for t in tries]}
