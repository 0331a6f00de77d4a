"""Train-step tokens/s, MFU and peak memory of InternVL3-1B/-8B, LoRA and full fine-tuning, on a GPU.

  python benchmarks/gpu_mfu.py [--json]                  # H100/H200: four rows, each printed when done
  python benchmarks/gpu_mfu.py --rows 1b:lora --batch 8  # chosen rows, fixed batch per device
  python benchmarks/gpu_mfu.py --smoke --json            # CPU: configs/tiny.py, seconds per row

Random weights, bf16 compute, rows of 2048 tokens each holding one 448 px image (256
placeholders) and text, through the real jitted step of `training/step.py` (masked
cross-entropy in the size config's `train.loss_chunk` blocks, gradients w.r.t. the trainable
filter, global-norm clipping, AdamW; state donated). LoRA rows are the paper's recipe: r=16
adapters (float32) on every linear of the language model over a frozen bfloat16 base; full
rows keep float32 master weights and moments. Attention runs on cuDNN's flash kernel on GPUs
(`--attention`), falling back to XLA's if cuDNN rejects the shapes. Each row runs in its own process, so its peak memory is its own and an
out-of-memory stays in that row (`--smoke` runs its rows in one process).

Batch per device (unless `--batch`): the largest that fits. A compile at batch 1 gives XLA's
buffer sizes, the state and one row's temporaries; the batch is (0.9 x memory limit - state) /
temporaries, compiled again and halved on out-of-memory. A row whose state alone cannot fit is
reported as skipped.

MFU = model FLOPs per step / step time / (devices x dense bf16 peak), FLOPs counted as MaxText
does (see `facellm_jax.training.step.train_flops_per_step`): 2 per multiply-accumulate weight and token forward, backward twice the
forward where it runs, attention's two [T, T] matmuls with causal masking counted as half of the
full ones. Rematerialization and padding are not discounted: every position is computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import common
from facellm_jax import hf
from facellm_jax.models import lora as lora_lib
from facellm_jax.models import sharding
from facellm_jax.models.config import FaceLLMConfig, from_config_dict
from facellm_jax.models import attention as attention_lib
from facellm_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = {"1b": "internvl3_1b", "8b": "internvl3_8b", "tiny": "tiny"}
MODES = ("lora", "full")
GB = 2**30
MEMORY_FRACTION = 0.9  # of the device limit the batch search may plan for
NO_ACCELERATOR = "no GPU/TPU found; on a CPU run the smoke test (--smoke)"


@dataclasses.dataclass(frozen=True)
class Row:
  arch: str
  mode: str

  @classmethod
  def parse(cls, spec: str) -> Row:
    arch, _, mode = spec.partition(":")
    if arch not in ARCHS or mode not in MODES:
      raise ValueError(f"row {spec!r}: expected ARCH:MODE with ARCH in {sorted(ARCHS)} and MODE in {MODES}")
    return cls(arch, mode)

  def __str__(self) -> str:
    return f"{self.arch}:{self.mode}"


def size_config(arch: str):
  """The size file's whole ConfigDict (the model block and the training defaults, e.g. `train.loss_chunk`)."""
  spec = importlib.util.spec_from_file_location(ARCHS[arch], ROOT / "configs" / f"{ARCHS[arch]}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def load_config(arch: str) -> FaceLLMConfig:
  block = size_config(arch).model.to_dict()
  block.pop("hf_checkpoint", None)
  return from_config_dict(block)


def make_batch(c: FaceLLMConfig, rows: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """One micro-batch [A=1, rows, ...]: an image run after a short prefix, loss on the text after it."""
  rng = np.random.default_rng(seed)
  n = c.image_seq_length
  if seq_len < n + 8:
    raise ValueError(f"--seq-len {seq_len} cannot hold the {n} image tokens and some text")
  ids = rng.integers(c.image_token_id + 1, c.text.vocab_size, (rows, seq_len + 1)).astype(np.int32)
  ids[:, 4:4 + n] = c.image_token_id
  loss_mask = np.zeros((rows, seq_len), np.int32)
  loss_mask[:, 4 + n:] = 1
  size = c.vision.image_size
  batch = {
      "input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": loss_mask,
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
      "segment_ids": np.ones((rows, seq_len), np.int32), "num_images": np.ones((rows,), np.int32),
      "pixel_values": rng.standard_normal((rows, 1, size, size, 3)).astype(np.float32)}
  return {k: x[None] for k, x in batch.items()}


def _is_oom(err: Exception) -> bool:
  text = str(err).lower()
  return "resource_exhausted" in text or "out of memory" in text


def _step_bytes(compiled) -> tuple[int, int]:
  """(bytes the step needs on a device, of which temporaries), from XLA's buffer assignment."""
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return total, m.temp_size_in_bytes


def fit_batch(need: int, temp: int, *, limit: int, max_batch: int) -> int:
  """Rows per device from a batch-1 compile needing `need` bytes, `temp` of them temporaries.

  Everything but the temporaries (weights, optimizer state, the batch) is fixed; the temporaries
  are taken as all per-row, which overestimates a row and so errs on the side of fitting.
  """
  return max(1, min(int((MEMORY_FRACTION * limit - (need - temp)) // max(temp, 1)), max_batch))


def _with_attention(graphdef: nnx.GraphDef, state: nnx.State, llm: str, vit: str) -> nnx.GraphDef:
  """The (model, optimizer) graphdef with the LLM's and the ViT's attention set to `llm` / `vit`."""
  model, optimizer = nnx.merge(graphdef, state)
  attention_lib.set_attention(model, llm, vit)
  return nnx.split((model, optimizer))[0]


def run_row(row: Row, a: argparse.Namespace) -> dict[str, Any]:
  """Builds, sizes, compiles and times one row in this process."""
  devices = jax.devices()[:a.devices] if a.devices else jax.devices()
  dev = devices[0]
  out: dict[str, Any] = {"row": str(row), "device": dev.device_kind, "devices": len(devices), "seq_len": a.seq_len,
                         "status": "ok"}
  if dev.platform == "cpu" and not a.smoke:
    return {**out, "status": "error", "reason": NO_ACCELERATOR}
  limit = (dev.memory_stats() or {}).get("bytes_limit")
  c = load_config(row.arch)
  lora = lora_lib.LoRAConfig() if row.mode == "lora" else None
  wrt = lora_lib.trainable_filter(row.mode)
  param_dtype = jnp.bfloat16 if lora else jnp.float32
  oc = step_lib.OptimConfig(learning_rate=1e-5, num_steps=1000)

  base = lora_lib.count_params(hf.abstract_model(c))
  adapters = 0 if lora is None else lora_lib.lora_param_count(c, lora)
  trainable = adapters or base
  out.update(total_params=base + adapters, trainable_params=trainable)
  # Every weight once, plus a float32 gradient and two float32 AdamW moments per trainable one.
  state_bytes = base * jnp.dtype(param_dtype).itemsize + adapters * 4 + trainable * 12
  if limit and state_bytes > MEMORY_FRACTION * limit * len(devices):
    return {**out, "status": "skipped", "reason": f"weights, gradients and AdamW state need {state_bytes / GB:.0f} GB; "
            f"{len(devices)} device(s) offer {limit * len(devices) / GB:.0f} GB"}
  start = time.perf_counter()
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  model = sharding.create_model(c, mesh, dtype=jnp.bfloat16, param_dtype=param_dtype, lora=lora)
  optimizer = nnx.Optimizer(model, step_lib.make_tx(oc), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer
  state_sh = sharding.state_shardings(state, mesh)
  out["init_s"] = round(time.perf_counter() - start, 1)
  first = attention_lib.resolve(a.attention, dev.platform)
  # (LLM, ViT) attention to try in turn: cuDNN may reject the ViT's 1025 tokens, or everything.
  choices = [(first, first)] + ([("cudnn", "xla"), ("xla", "xla")] if first == "cudnn" else [])

  def compile_for(per_device: int):
    host = make_batch(c, per_device * len(devices), a.seq_len)
    batch_sh = step_lib.batch_shardings(mesh, host)
    batch = jax.device_put(host, batch_sh)
    while True:
      gdef = _with_attention(graphdef, state, *choices[0])
      step = step_lib.make_train_step(gdef, wrt, step_lib.learning_rate_schedule(oc),
                                      loss_chunk=size_config(row.arch).train.loss_chunk)
      try:
        return step_lib.jit_train_step(step, state_sh, batch_sh, mesh).lower(state, batch).compile(), batch
      except Exception as err:  # an attention kernel refused the shapes: try the next choice
        if len(choices) == 1 or _is_oom(err):
          raise
        out.setdefault("attention_fallbacks", []).append(f"{choices.pop(0)}: {str(err).splitlines()[0][:200]}")

  start = time.perf_counter()
  per_device = a.batch or (2 if limit is None else 1)
  try:
    compiled, batch = compile_for(per_device)
    if not a.batch and limit is not None:
      per_device = fit_batch(*_step_bytes(compiled), limit=limit, max_batch=a.max_batch)
      if per_device > 1:
        compiled, batch = compile_for(per_device)
      while per_device > 1 and _step_bytes(compiled)[0] > limit:
        per_device //= 2
        compiled, batch = compile_for(per_device)
  except Exception as err:
    if not _is_oom(err):
      raise
    return {**out, "status": "oom", "reason": f"does not compile into memory at batch {per_device} per device"}
  out["compile_s"] = round(time.perf_counter() - start, 1)

  try:
    for _ in range(a.warmup):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(a.steps):
      state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])  # waits for the last step
    seconds = (time.perf_counter() - start) / a.steps
  except Exception as err:
    if not _is_oom(err):
      raise
    return {**out, "status": "oom", "reason": f"out of memory running batch {per_device} per device"}

  rows = per_device * len(devices)
  flops = step_lib.train_flops_per_step(c, rows=rows, seq_len=a.seq_len, images=rows, lora=lora)
  peak = step_lib.peak_flops(dev)
  stats = dev.memory_stats() or {}
  out.update(
      batch_per_device=per_device, attention="llm {}, vit {}".format(*choices[0]), step_s=round(seconds, 4), loss=round(loss, 4),
      tokens_per_s=round(rows * a.seq_len / seconds), images_per_s=round(rows / seconds, 2),
      flops_per_step=float(f"{flops:.4e}"),
      achieved_tflops_per_device=round(flops / seconds / len(devices) / 1e12, 3),
      mfu=None if peak is None else round(flops / seconds / (peak * len(devices)), 4),
      peak_device_gb=round(stats["peak_bytes_in_use"] / GB, 2) if "peak_bytes_in_use" in stats else None,
      peak_host_rss_gb=round(common.peak_rss_mb() / 1024, 2), xla_step_gb=round(_step_bytes(compiled)[0] / GB, 3))
  if not math.isfinite(loss):
    out.update(status="error", reason=f"non-finite loss {loss}")
  return out


def _child_command(row: Row, a: argparse.Namespace) -> list[str]:
  cmd = [sys.executable, __file__, "--child", str(row), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
         "--warmup", str(a.warmup), "--attention", a.attention, "--max-batch", str(a.max_batch),
         "--devices", str(a.devices)]
  return cmd + (["--batch", str(a.batch)] if a.batch else []) + (["--smoke"] if a.smoke else [])


def _run_child(row: Row, a: argparse.Namespace) -> dict[str, Any]:
  try:
    proc = subprocess.run(_child_command(row, a), capture_output=True, text=True, timeout=a.row_timeout)
  except subprocess.TimeoutExpired:
    return {"row": str(row), "status": "timeout", "reason": f"over --row-timeout {a.row_timeout} s"}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode == 0 and lines:
    return json.loads(lines[-1])
  tail = (proc.stderr or proc.stdout).strip().splitlines()
  return {"row": str(row), "status": "error", "reason": tail[-1][:300] if tail else f"exit {proc.returncode}"}


def _describe(r: dict[str, Any]) -> str:
  if r["status"] != "ok":
    return f"{r['row']:10s} {r['status']}: {r.get('reason', '')}"
  mfu = "n/a (no peak for this device)" if r["mfu"] is None else f"{r['mfu']:.1%}"
  memory = r["peak_device_gb"] if r["peak_device_gb"] is not None else f"{r['peak_host_rss_gb']} (host RSS)"
  return (f"{r['row']:10s} batch {r['batch_per_device']}/device  {r['step_s']:.3f} s/step  "
          f"{r['tokens_per_s']:,} tokens/s  MFU {mfu}  peak memory {memory} GB  attention {r['attention']}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
  parser.add_argument("--smoke", action="store_true", help="CPU smoke test: configs/tiny.py, short rows")
  parser.add_argument("--rows", default=None, help="comma-separated ARCH:MODE (default 1b:lora,1b:full,8b:lora,8b:full)")
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=0, help="rows per device (default: the largest that fits)")
  parser.add_argument("--max-batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row after compiling")
  parser.add_argument("--attention", choices=attention_lib.IMPLEMENTATIONS, default="auto")
  parser.add_argument("--devices", type=int, default=0, help="use the first N devices (default all)")
  parser.add_argument("--row-timeout", type=int, default=300, help="seconds per row")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  a = parser.parse_args(argv)
  try:
    default = "tiny:lora,tiny:full" if a.smoke else "1b:lora,1b:full,8b:lora,8b:full"
    rows = [Row.parse(spec) for spec in (a.rows or default).split(",")]
  except ValueError as err:
    parser.exit(2, f"gpu_mfu: {err}\n")
  if a.smoke:
    a.seq_len, a.steps, a.warmup, a.batch, a.devices = 64, 1, 1, a.batch or 2, a.devices or 1
  if min(a.seq_len, a.steps, a.max_batch) < 1 or min(a.warmup, a.batch, a.devices) < 0:
    parser.exit(2, "gpu_mfu: --seq-len, --steps, --max-batch must be >= 1 and --warmup, --batch, --devices >= 0\n")
  if a.child:
    print(json.dumps(run_row(Row.parse(a.child), a)))
    return None

  # On an accelerator this process never touches it: each row's process gets all of its memory.
  results = []
  for row in rows:
    with common.progress(f"{row}" + ("" if a.smoke else " (own process)")):
      results.append(run_row(row, a) if a.smoke else _run_child(row, a))
    if results[-1].get("reason") == NO_ACCELERATOR:
      parser.exit(2, f"gpu_mfu: {NO_ACCELERATOR}\n")
    print(_describe(results[-1]), flush=True)
  report = {"benchmark": "gpu_mfu", "smoke": a.smoke, "seq_len": a.seq_len, "steps": a.steps, "rows": results,
            "machine": common.machine(), "jax": jax.__version__}
  if a.json:
    print(json.dumps(report))
  return report


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # inherited by the rows; their batch plans on it
  main()
