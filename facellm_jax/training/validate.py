"""Every training config value checked up front, before anything is compiled or written.

A bad value must not surface as a ZeroDivisionError after compiling, or as a run that exits 0
having done nothing: `check_config` names every bad key in one line. The rules that belong to
another module are that module's own (the schedule names to `step.learning_rate_schedule`, the
trainable kinds to `lora.trainable_filter`, LoRA's to `lora.LoRAConfig`, mesh sizes to
`sharding.make_mesh`, which runs right after this, before the model exists).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from facellm_jax import paths
from facellm_jax.models import attention as attention_lib
from facellm_jax.models import lora as lora_lib
from facellm_jax.models import stack
from facellm_jax.training import step as step_lib

COMPUTE_DTYPES = ("float32", "bfloat16")
_LOCAL_HINT = ("must be a local path (a gcsfuse mount is one: `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`), "
               "or copy it with `gcloud storage cp -r URL DIR`")


class ConfigError(ValueError):
  """A config value that cannot work (the message says which key and why)."""


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# key -> (test, what it must be)
_RULES = {
    "data.cutoff_len": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.split": (lambda v: isinstance(v, str) and v != "", "a split name such as 'train'"),
    "data.max_images_per_row": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = by the tokens)"),
    "train.num_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "train.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.grad_accum": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.learning_rate": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "train.warmup_ratio": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "train.weight_decay": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "train.max_grad_norm": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0 (0 = no clipping)"),
    "train.compute_dtype": (lambda v: v in COMPUTE_DTYPES, f"one of {list(COMPUTE_DTYPES)}"),
    "train.base_dtype": (lambda v: v in ("auto", *COMPUTE_DTYPES), f"one of {['auto', *COMPUTE_DTYPES]}"),
    "train.attention": (lambda v: v in attention_lib.IMPLEMENTATIONS, f"one of {list(attention_lib.IMPLEMENTATIONS)}"),
    "train.loss_chunk": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = whole rows)"),
    "train.remat": (lambda v: v in stack.REMAT_POLICIES, f"one of {list(stack.REMAT_POLICIES)}"),
    "train.scan_layers": (lambda v: isinstance(v, bool), "true or false"),
    "train.seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "train.log_every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "checkpoint.every_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "checkpoint.keep": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}
_LORA_RULES = {
    "lora.rank": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lora.alpha": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
}
# Paths read by the training input side; only local ones can be read there.
_LOCAL_PATHS = ("data.dir", "tokenizer.path", "model.hf_checkpoint")


def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def _has(cfg: ml_collections.ConfigDict, key: str) -> bool:
  node = cfg
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False
    node = node[part]
  return True


def batch_split_problem(batch: int, accum: int, shards: int, processes: int = 1) -> str | None:
  """The one-line error when `batch` rows do not split into `accum` micro-batches whose rows divide
  over `shards` data x fsdp devices and `processes` hosts (None when they do), saying what to set."""
  micro, rem = divmod(batch, accum)
  if not rem and micro % shards == 0 and micro % processes == 0:
    return None
  unit = math.lcm(shards, processes)
  accums = [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % unit == 0]
  hint = (f"set train.grad_accum to one of {accums}" if accums else
          f"no train.grad_accum does: set train.batch_size to a multiple of {unit}, or move chips from "
          "mesh.shape.fsdp to mesh.shape.tensor (rows split over data x fsdp only)")
  return (f"train.batch_size={batch} must split into train.grad_accum={accum} micro-batches whose rows divide "
          f"over data x fsdp = {shards} devices and {processes} process(es): {hint}")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming every key whose value cannot work, all in one line."""
  problems = []
  for key, (ok, expected) in {**_RULES, **(_LORA_RULES if cfg.train.trainable == "lora" else {})}.items():
    if _has(cfg, key) and not ok(_get(cfg, key)):
      problems.append(f"{key} must be {expected}, got {_get(cfg, key)!r}")
  if not cfg.data.dir:
    problems.append("data.dir is empty: set --config.data.dir to a dataset written by `python -m data_gen generate`")
  for key in _LOCAL_PATHS:
    value = _get(cfg, key) if _has(cfg, key) else ""
    if value and paths.is_remote(value):
      problems.append(f"{key}={value} {_LOCAL_HINT}")
  if _has(cfg, "train.base_dtype") and cfg.train.base_dtype == "bfloat16" and cfg.train.trainable != "lora":
    problems.append("train.base_dtype=bfloat16 is for LoRA runs (frozen base); train.trainable="
                    f"{cfg.train.trainable!r} keeps float32 master weights")
  try:
    lora_lib.trainable_filter(cfg.train.trainable)
  except ValueError as e:
    problems.append(f"train.trainable: {e}")
  if cfg.train.trainable == "lora" and not any(p.startswith("lora.") for p in problems):
    try:
      lora_lib.LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets),
                          modules=tuple(cfg.lora.modules))
    except ValueError as e:
      problems.append(f"lora: {e}")
  if not any(p.startswith("train.") for p in problems):
    t = cfg.train
    try:
      step_lib.learning_rate_schedule(step_lib.OptimConfig(
          learning_rate=t.learning_rate, num_steps=t.num_steps, warmup_ratio=t.warmup_ratio,
          schedule=t.schedule, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm))
    except ValueError as e:
      problems.append(str(e))
  if problems:
    raise ConfigError("; ".join(problems))
