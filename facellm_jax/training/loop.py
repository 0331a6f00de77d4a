"""The training loop: config -> mesh, model, data -> jitted steps -> metrics and checkpoints.

Everything that can be wrong with the inputs (every config value, the workdir, the dataset, mesh,
batch split, tokenizer, an existing checkpoint of another model) is checked before anything is
written to the workdir, so a failed start never leaves state that breaks the next run. The
workdir may be local or a `gs://` URL (`paths.py`); only process 0 writes its shared files:
  config.json      the resolved config
  metrics.jsonl    one JSON object per logged step, each step once: on a resume the lines past the
                   restored step are dropped and the rerun logs them again (`paths.RecordFile`)
  tokenizer/       the tokenizer trained on the dataset's text, for configs without one
  checkpoints/     Orbax (see `training/checkpoint.py`); a damaged step is set aside there
  tensorboard/     the same scalars as TensorBoard event files (`training/summaries.py`; on a
                   resume TensorBoard drops the old events past the restored step)
SIGTERM (a preemption) and SIGINT (Ctrl-C) stop after the current step with a checkpoint saved.
Throughput is the last step's tokens (non-padding, images' placeholders included) and examples over
the mean step time since the previous log line; MFU uses `step.train_flops_per_step`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from facellm_jax import hf
from facellm_jax import paths
from facellm_jax.input import pipeline
from facellm_jax.input import tokenizer as tok_lib
from facellm_jax.models import attention as attention_lib
from facellm_jax.models import config as config_lib
from facellm_jax.models import lora as lora_lib
from facellm_jax.models import sharding
from facellm_jax.models import stack
from facellm_jax.training import checkpoint as ckpt_lib
from facellm_jax.training import step as step_lib
from facellm_jax.training import summaries as summaries_lib
from facellm_jax.training import validate

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Records read to train a tokenizer for a config that has none (tiny configs).
_TOKENIZER_TEXTS = 20_000

ConfigError = validate.ConfigError


def model_config(cfg: ml_collections.ConfigDict) -> config_lib.FaceLLMConfig:
  """The model architecture: the HF checkpoint's config.json when starting from one."""
  path = cfg.model.get("hf_checkpoint", "")
  if path:
    return hf.read_config(path)
  block = cfg.model.to_dict()
  block.pop("hf_checkpoint", None)
  return config_lib.from_config_dict(block)


def lora_config(cfg: ml_collections.ConfigDict) -> lora_lib.LoRAConfig | None:
  if cfg.train.trainable != "lora":
    return None
  return lora_lib.LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                             targets=tuple(cfg.lora.targets), modules=tuple(cfg.lora.modules))


def image_slots(cfg: ml_collections.ConfigDict, mc: config_lib.FaceLLMConfig) -> int:
  """Image slots per row (the tower runs on each): `data.max_images_per_row`, or for 0 the
  pipeline's default; the compile-only step and the FLOP count read it here too."""
  return pipeline.image_slots(cfg.data.cutoff_len, mc.image_seq_length, cfg.data.get("max_images_per_row", 0),
                              packing=cfg.data.packing)


def optim_config(cfg: ml_collections.ConfigDict) -> step_lib.OptimConfig:
  t = cfg.train
  return step_lib.OptimConfig(learning_rate=t.learning_rate, num_steps=t.num_steps, warmup_ratio=t.warmup_ratio,
                              schedule=t.schedule, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)


def _rows_per_process(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  t = cfg.train
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  problem = validate.batch_split_problem(t.batch_size, t.grad_accum, shards, jax.process_count())
  if problem:
    raise ConfigError(problem)
  return t.batch_size // t.grad_accum // jax.process_count()


def _tokenizer(cfg: ml_collections.ConfigDict, workdir: paths.Path, source, vocab_size: int):
  path = cfg.tokenizer.path or cfg.model.get("hf_checkpoint", "")
  if path:
    return tok_lib.load_tokenizer(path)
  out = workdir / "tokenizer"
  if (out / "tokenizer.json").exists():
    return tok_lib.load_tokenizer(paths.local_copy(out))
  # Trained in a local temporary folder, removed on any failure, then copied with tokenizer.json
  # last: a tokenizer/ without it is incomplete and trained again.
  n = min(len(source), _TOKENIZER_TEXTS)
  texts = (pipeline.record_text(_read(lambda: source[i], f"record {i} of data.dir {cfg.data.dir}"))
           for i in range(n))
  with tempfile.TemporaryDirectory(prefix="facellm-tokenizer-") as tmp:
    tokenizer = tok_lib.train_tokenizer(texts, vocab_size, tmp)
    if jax.process_index() == 0:
      paths.copy_dir(tmp, out, last="tokenizer.json")
  return tokenizer


def base_dtype(cfg: ml_collections.ConfigDict, platform: str) -> jnp.dtype:
  """`train.base_dtype` of the base weights: LoRA's frozen base may be bfloat16; trained weights stay float32.

  `validate.check_config` reports bad values for a training run; this raises them too for the
  callers that build a model without it (`compile_only`).
  """
  name = cfg.train.base_dtype
  if name == "auto":
    name = "bfloat16" if cfg.train.trainable == "lora" and platform != "cpu" else "float32"
  if name not in _DTYPES:
    raise ConfigError(f"train.base_dtype must be auto, float32 or bfloat16, got {name!r}")
  if name == "bfloat16" and cfg.train.trainable != "lora":
    raise ConfigError(f"train.base_dtype=bfloat16 is for LoRA runs (frozen base); train.trainable="
                      f"{cfg.train.trainable!r} keeps float32 master weights")
  return _DTYPES[name]


def attention(cfg: ml_collections.ConfigDict, platform: str) -> str:
  """`train.attention` resolved for `platform` (see `models/attention.py`)."""
  try:
    return attention_lib.resolve(cfg.train.attention, platform)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _read(get, what: str):
  """`get()`, with a damaged dataset's read error (riegeli raises RuntimeError) as one line."""
  try:
    return get()
  except (RuntimeError, OSError) as e:
    raise pipeline.DatasetError(f"{what} cannot be read ({paths.one_line(e, 300)}); the dataset is damaged: "
                                "regenerate it") from e


def build_model(cfg: ml_collections.ConfigDict, mc: config_lib.FaceLLMConfig,
                mesh: jax.sharding.Mesh) -> nnx.Module:
  """The train model on `mesh`: the config's dtypes, attention kernel, layer layout (`train.scan_layers`)
  and rematerialization (`train.remat`), from a random init or the HF checkpoint."""
  platform = mesh.devices.flat[0].platform
  dtype, base, impl = _DTYPES[cfg.train.compute_dtype], base_dtype(cfg, platform), attention(cfg, platform)
  lora = lora_config(cfg)
  scan = bool(cfg.train.get("scan_layers", False))
  path = cfg.model.get("hf_checkpoint", "")
  if not path:
    model = sharding.create_model(mc, mesh, seed=cfg.train.seed, dtype=dtype, param_dtype=base, lora=lora,
                                  scan_layers=scan)
  else:
    abstract = hf.abstract_model(mc, base, dtype, scan_layers=scan)
    model, _ = hf.load_pretrained(path, base, compute_dtype=dtype, scan_layers=scan,
                                  shardings=sharding.state_shardings(abstract, mesh))
    if lora is not None:
      lora_lib.apply_lora(model, lora, nnx.Rngs(cfg.train.seed))
      sharding.shard_model(model, mesh)
  stack.set_remat(model, cfg.train.get("remat", "none"))
  return attention_lib.set_attention(model, impl)


def _global_batch(micro: list[dict[str, np.ndarray]], shardings: Mapping[str, Any],
                  process_count: int) -> dict[str, jax.Array]:
  """Stacks this process's micro-batches [A, b, ...] (images per row) into global arrays."""
  out = {}
  for key in micro[0]:
    if key == "pixel_values":
      local = np.stack([_images_per_row(m) for m in micro])
    else:
      local = np.stack([m[key] for m in micro])
    shape = (local.shape[0], local.shape[1] * process_count, *local.shape[2:])
    out[key] = jax.make_array_from_process_local_data(shardings[key], local, shape)
  return out


def _images_per_row(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """The pipeline's images-first [b*M, ...] back to per-row slots [b, M, ...]."""
  counts = batch["num_images"]
  flat = batch["pixel_values"]
  rows = np.zeros((len(counts), flat.shape[0] // len(counts), *flat.shape[1:]), flat.dtype)
  offset = 0
  for r, c in enumerate(counts):
    rows[r, :c] = flat[offset:offset + c]
    offset += c
  return rows


class Preemption:
  """Turns SIGTERM (a preemption) and SIGINT (Ctrl-C) into a flag the loop checks after each step,
  then saves and stops. A second Ctrl-C stops at once (KeyboardInterrupt), saving nothing new."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    try:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    except ValueError:  # not the main thread: no preemption handling.
      self._previous = {}
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def requested(self, sync: bool) -> bool:
    """Whether to stop now; with `sync`, on every process as soon as one was signalled (they must
    save the same step together)."""
    if jax.process_count() == 1:
      return self.signum is not None
    if not sync:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    signals = multihost_utils.process_allgather(np.array([self.signum or 0]))
    self.signum = self.signum or int(np.max(signals)) or None
    return self.signum is not None

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint (or, `saved=False`, in a stage
  short enough to redo); rerun with the same workdir."""

  def __init__(self, signum: int, step: int, saved: bool = True):
    self.signum = signum
    then = ("checkpoint saved, rerun the same command to resume" if saved else
            "nothing saved (a short stage), rerun the same command to start it again")
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {then}")


def _check_dataset(cfg: ml_collections.ConfigDict):
  """The training split of `data.dir` (a local folder: `validate` refuses URLs)."""
  if not os.path.isdir(cfg.data.dir):
    what = "is a file" if os.path.exists(cfg.data.dir) else "does not exist"
    raise FileNotFoundError(f"data.dir {cfg.data.dir} {what}; expected the output directory of "
                            "`python -m data_gen generate`")
  return pipeline.open_tfds_source(cfg.data.dir, cfg.data.get("split", "train"))


@dataclasses.dataclass
class TrainResult:
  metrics: list[dict[str, float]]  # what this call logged
  state: nnx.State  # (model, optimizer) state after the last step, sharded on the mesh


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, show_progress: bool = True,
          devices: Sequence[jax.Device] | None = None) -> TrainResult:
  """Trains to `train.num_steps`, resuming from the workdir's latest intact checkpoint.

  `workdir` is a local folder or a `gs://` URL; `devices` (default: all) is what `mesh.shape` is
  laid over.
  """
  validate.check_config(cfg)
  workdir = paths.check_output_dir(workdir, "--workdir")
  t = cfg.train
  wrt = lora_lib.trainable_filter(t.trainable)
  source = _check_dataset(cfg)
  mesh = sharding.make_mesh(dict(cfg.mesh.shape), devices)
  rows = _rows_per_process(cfg, mesh)
  mc = model_config(cfg)
  paths.makedirs(workdir)
  meta = {"model": config_lib.to_config_dict(mc), "trainable": t.trainable,
          "lora": None if t.trainable != "lora" else dict(cfg.lora.to_dict())}
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", every_steps=cfg.checkpoint.every_steps,
                               keep=cfg.checkpoint.keep, meta=meta)
  try:
    return _train(cfg, workdir, ckpt, source=source, mesh=mesh, rows=rows, mc=mc, wrt=wrt,
                  show_progress=show_progress)
  finally:
    ckpt.close()


def _train(cfg: ml_collections.ConfigDict, workdir: paths.Path, ckpt: ckpt_lib.Checkpointer, *, source,
           mesh: jax.sharding.Mesh, rows: int, mc: config_lib.FaceLLMConfig, wrt, show_progress: bool) -> TrainResult:
  t = cfg.train
  latest = ckpt.latest_setup_step()  # a checkpoint of another setup is refused before anything is written.
  tokenizer = _tokenizer(cfg, workdir, source, mc.text.vocab_size)
  if tokenizer.vocab_size > mc.text.vocab_size or tokenizer.image_token_id != mc.image_token_id:
    raise ConfigError(
        f"tokenizer (vocab {tokenizer.vocab_size}, <IMG_CONTEXT> id {tokenizer.image_token_id}) does not "
        f"fit the model (vocab {mc.text.vocab_size}, image_token_id {mc.image_token_id})")
  if jax.process_index() == 0:
    paths.write_text(workdir / "config.json", cfg.to_json_best_effort(indent=2, sort_keys=True))

  slots = image_slots(cfg, mc)
  dataset = pipeline.make_dataset(
      source, tokenizer, image_size=mc.vision.image_size, num_image_tokens=mc.image_seq_length,
      seq_len=cfg.data.cutoff_len, batch_size=rows, packing=cfg.data.packing, seed=t.seed,
      max_images_per_row=slots,
      system_prompt=cfg.data.get("system_prompt", ""))
  iterator = iter(dataset)

  model = build_model(cfg, mc, mesh)
  oc = optim_config(cfg)
  optimizer = nnx.Optimizer(model, step_lib.make_tx(oc), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  state_sh = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  sharding.assert_sharded(state[0], mesh)
  n_trainable = step_lib.count_trainable(nnx.state(model, wrt))
  del model, optimizer

  start = 0
  if latest is not None:
    model, optimizer = nnx.merge(graphdef, state)
    # The live arrays already sit in their target shardings: restore straight into those.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            (nnx.to_pure_dict(nnx.state(model, wrt)), nnx.to_pure_dict(nnx.state(optimizer))))
    restored = ckpt.restore(abstract[0], abstract[1], iterator)
    if restored is not None:
      start, params, opt_state = restored
      trainable = nnx.state(model, wrt)
      nnx.replace_by_pure_dict(trainable, params)
      nnx.update(model, trainable)
      opt = nnx.state(optimizer)
      nnx.replace_by_pure_dict(opt, opt_state)
      nnx.update(optimizer, opt)
      state = nnx.state((model, optimizer))
      logging.info("resumed from %s/%d", ckpt.directory, start)

  if start >= t.num_steps:
    return TrainResult([], state)
  rows_global = rows * jax.process_count()
  dummy = {k: None for k in ("input_ids", "targets", "loss_mask", "positions", "segment_ids",
                             "num_images", "pixel_values")}
  batch_sh = step_lib.batch_shardings(mesh, dummy)
  step_fn = step_lib.make_train_step(graphdef, wrt, step_lib.learning_rate_schedule(oc), loss_chunk=t.loss_chunk)
  train_step = step_lib.jit_train_step(step_fn, state_sh, batch_sh, mesh)
  peak = step_lib.peak_flops(jax.devices()[0])
  flops = step_lib.train_flops_per_step(mc, rows=rows_global * t.grad_accum, seq_len=cfg.data.cutoff_len,
                                        images=rows_global * t.grad_accum * slots, trainable=t.trainable,
                                        lora=lora_config(cfg))

  def save(step: int, force: bool = False) -> None:
    if not (force or ckpt.due(step)):  # merging and flattening the state cost ~2% of a demo step
      return
    model, optimizer = nnx.merge(graphdef, state)
    ckpt.save(step, nnx.to_pure_dict(nnx.state(model, wrt)), nnx.to_pure_dict(nnx.state(optimizer)),
              iterator.get_state(), force=force)

  logged: list[dict[str, float]] = []
  writer = jax.process_index() == 0
  # Steps past the restored checkpoint are trained and logged again: their old lines go.
  metrics_file = paths.RecordFile(workdir / "metrics.jsonl", keep=lambda r: r.get("step", 0) <= start) \
      if writer else None
  summaries = summaries_lib.Scalars(workdir / "tensorboard", purge_step=start + 1 if start else None) \
      if writer else None
  bar = tqdm(total=t.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=not show_progress or not writer)
  logging.info("training %d trainable parameters (%s) on mesh %s, %d rows/step",
               n_trainable, t.trainable, dict(mesh.shape), rows_global * t.grad_accum)
  window_start, window_steps = time.perf_counter(), 0
  try:
    with Preemption() as preemption:
      for step in range(start, t.num_steps):
        micro = [_read(lambda: next(iterator), f"the batch of step {step + 1} from data.dir {cfg.data.dir}")
                 for _ in range(t.grad_accum)]
        batch = _global_batch(micro, batch_sh, jax.process_count())
        state, metrics = train_step(state, batch)
        window_steps += 1
        done = step + 1
        logs = done % t.log_every == 0 or done == t.num_steps or done == start + 1
        if logs:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          seconds = (time.perf_counter() - window_start) / window_steps
          record = {"step": done, **metrics, "seconds_per_step": seconds,
                    "tokens_per_s": metrics["tokens"] / seconds,
                    "examples_per_s": metrics["examples"] / seconds}
          if peak is not None:
            record["mfu"] = flops / seconds / (peak * jax.device_count())
          logged.append(record)
          if writer:
            metrics_file.append([record])
            summaries.add({f"train/{k}": v for k, v in record.items() if k != "step"}, done)
          bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
          window_start, window_steps = time.perf_counter(), 0
        bar.update(1)
        # Several processes agree on stopping where they sync anyway (log and checkpoint steps).
        if preemption.requested(sync=logs or done % cfg.checkpoint.every_steps == 0):
          save(done, force=True)
          ckpt.wait()
          raise Preempted(preemption.signum, done)
        save(done, force=done == t.num_steps)
  finally:
    bar.close()
  return TrainResult(logged, state)
