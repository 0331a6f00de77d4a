"""Compile-only for inference: `evaluate`'s prefill and decode steps compiled for a TPU slice, on any machine with libtpu.

`python -m facellm_jax.evaluate --compile_only --config=configs/internvl3_38b.py --topology=v5p-8
[--mesh tensor=4] [--batch_size 16] [--cache_len 4096] [--max_tiles 1] [--dtype bfloat16]`

The same jitted functions `inference/generate.py` runs (`_prefill`, `_decode`) are lowered with
abstract weights in the mesh shardings `load.inference_mesh` picks for the slice's chips, a
batch of `--batch_size` prompts that fill the cache but for the first decode stage's 32 new
tokens, `--max_tiles` 448 px tiles per prompt, and the KV cache of `--cache_len` slots over
rows and kv heads. XLA's buffer assignment then says what one chip holds for each: the prefill
(weights + images + the cache it writes) and the decode loop (weights + cache + its
temporaries). `fits` is both within the chip's HBM. Topology names, HBM sizes and the
out-of-memory handling are `training/compile_only.py`'s; nothing is read but the config and
nothing is written. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax._src import config as jax_config  # the option's context manager (jax.config has only update)

from facellm_jax import hf
from facellm_jax.inference import generate, load
from facellm_jax.models import config as config_lib
from facellm_jax.models import sharding
from facellm_jax.training import compile_only as train_compile_only
from facellm_jax.training import loop

NEW_TOKENS = 32  # the first decode stage (`Generator`'s default `stage`)


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--compile_only", action="store_true",
                      help="compile prefill + decode for --topology and print bytes per chip as JSON; no evaluation")
  parser.add_argument("--topology", help="TPU slice for --compile_only: v5p-8, v5litepod-8, v6e-8, v5p:2x2x1, ...")
  parser.add_argument("--cache_len", type=int, default=4096, help="KV cache slots per row for --compile_only")


def model_config(args: argparse.Namespace) -> config_lib.FaceLLMConfig:
  """The architecture to compile: a training config file's (`--config`) or a HF directory's (`--hf`)."""
  if getattr(args, "hf", None):
    return hf.read_config(args.hf)
  if not args.config:
    raise ValueError("--compile_only needs --config=configs/<model>.py (or --hf DIR) for the architecture")
  cfg: ml_collections.ConfigDict = load.load_config_file(args.config)
  return loop.model_config(cfg)


def _abstract_state(mc: config_lib.FaceLLMConfig, mesh: jax.sharding.Mesh, dtype) -> tuple[Any, nnx.State]:
  """The model's graphdef and its params as ShapeDtypeStructs in their mesh shardings."""
  graphdef, state = nnx.split(hf.abstract_model(mc, dtype, dtype))
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(state), shardings)
  nnx.replace_by_pure_dict(state, placed)
  return graphdef, state


def _lowered(mc, mesh, *, batch: int, cache_len: int, tiles: int, dtype):
  """(prefill, decode) lowered for `batch` rows on `mesh`."""
  graphdef, state = _abstract_state(mc, mesh, dtype)
  layout = generate.Layout.of(mc, state)
  rows = layout.rows
  prompt = (cache_len - NEW_TOKENS + 1) // 64 * 64  # the Generator's 64-token prompt bucket
  s = mc.vision.image_size
  spec = lambda shape, dt, sh=rows: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  prefill = generate._prefill.lower(  # pylint: disable=protected-access
      graphdef, state, spec((batch, prompt), jnp.int32), spec((batch, prompt), jnp.bool_),
      spec((batch * tiles, s, s, 3), jnp.float32), cache_len=cache_len, layout=layout)
  t = mc.text
  kv = spec((batch, cache_len, t.num_key_value_heads, t.head_dim), dtype, layout.cache)
  cache = [generate.LayerCache(kv, kv) for _ in range(t.num_hidden_layers)]
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  decoding = generate._Decoding(NEW_TOKENS, (0,), 0, generate.Sampling())  # pylint: disable=protected-access
  decode = generate._decode.lower(  # pylint: disable=protected-access
      graphdef, state, scalar, spec((batch,), jnp.int32), cache, spec((batch,), jnp.bool_),
      spec((batch, NEW_TOKENS), jnp.int32), spec((batch, cache_len), jnp.bool_), scalar,
      spec((batch,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)), scalar, d=decoding, layout=layout)
  return {"prefill": prefill, "decode": decode}, prompt


def _compile(lowered, hbm: int | None) -> dict[str, Any]:
  start = time.perf_counter()
  try:
    with jax_config.enable_compilation_cache(False):
      compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if not train_compile_only._is_oom(e):  # pylint: disable=protected-access
      raise
    line = next((x for x in str(e).splitlines() if "exceeds" in x or "memory" in x.lower()), str(e).splitlines()[0])
    return {"compile_s": round(time.perf_counter() - start, 1), "fits": False, "xla_message": line.strip()}
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {"compile_s": round(time.perf_counter() - start, 1),
          "bytes_per_chip": {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                             "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes, "total": total},
          "gib_per_chip": round(total / train_compile_only.GiB, 2), "fits": hbm is None or total <= hbm}


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
  """The compile-only report of `evaluate --compile_only` (see the module doc)."""
  if not args.topology:
    raise ValueError("--compile_only needs --topology (e.g. v5p-8, v5litepod-8, v6e-8, v5p:2x2x1)")
  if args.cache_len <= NEW_TOKENS + 64:
    raise ValueError(f"--cache_len must exceed {NEW_TOKENS + 64} (a 64-token prompt and the first decode stage)")
  mc = model_config(args)
  devices = train_compile_only.topology_devices(args.topology)
  mesh = load.inference_mesh(mc, args.mesh, devices)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if args.batch_size % rows:
    raise ValueError(f"--batch_size {args.batch_size} must divide over data x fsdp = {rows} chips")
  dtype = load.DTYPES[args.dtype]
  tiles = args.max_tiles or 1
  kind = devices[0].device_kind
  hbm = train_compile_only.HBM_BYTES.get(kind)
  lowered, prompt = _lowered(mc, mesh, batch=args.batch_size, cache_len=args.cache_len, tiles=tiles, dtype=dtype)
  report: dict[str, Any] = {
      "topology": args.topology, "libtpu_topology": train_compile_only.topology_name(args.topology),
      "chips": len(devices), "device_kind": kind, "mesh": dict(mesh.shape), "batch": args.batch_size,
      "rows_per_chip": args.batch_size // rows, "cache_len": args.cache_len, "prompt_len": prompt,
      "tiles_per_row": tiles, "new_tokens": NEW_TOKENS, "dtype": args.dtype, "hbm_per_chip": hbm}
  for name, step in lowered.items():
    result = _compile(step, hbm)
    state = f"{result['gib_per_chip']} GiB" if "gib_per_chip" in result else "out of memory at compile"
    log(f"[compile_only] {name}: {state}, fits={result['fits']} ({result['compile_s']} s)")
    report[name] = result
  report["fits"] = all(report[name]["fits"] for name in lowered)
  return report
