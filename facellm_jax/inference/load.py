"""A model ready for inference from a training workdir or a HF InternVL directory.

A training workdir holds only what trained (see `training/checkpoint.py`): the adapters of a
LoRA run, everything for a full run, all but the vision tower otherwise. The rest is rebuilt the
way training built it (`training.loop.build_model`: the HF checkpoint in `model.hf_checkpoint`,
or the seeded init), then the trained params are restored over it from the latest complete
Orbax step. Steps still being written have no commit marker and are never picked; a damaged step
is reported in one line and the next older one is used (`checkpoint.restore_first_intact`, the
same mechanism training uses; inference only reads, so nothing is set aside here). The workdir
may be a `gs://` URL; a HF directory (`--hf`) is a local folder.

Inference runs on a mesh of this process's devices (`inference_mesh`: `--mesh data=D,fsdp=F,tensor=T`,
default every local device with tensor parallelism as wide as the heads allow and data parallelism
over the rest). The weights follow training's logical-axis rules (`models/sharding.py`) and are
restored straight into those shardings: Orbax reads each device's slices, a HF directory goes
one tensor at a time to its shards. With several processes each one holds its own replica on its
own devices (the model must fit one host's chips, as InternVL3-38B fits a v5p-8 or v6e-8) and
answers its own share of the questions. The params end up in `dtype` (LoRA adapters stay float32,
as in training, when they are kept unmerged).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from facellm_jax import hf
from facellm_jax import paths
from facellm_jax.input import tokenizer as tok_lib
from facellm_jax.models import config as config_lib
from facellm_jax.models import lora as lora_lib
from facellm_jax.models import sharding
from facellm_jax.models import stack
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.training import checkpoint as ckpt_lib
from facellm_jax.training import loop

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NoCheckpointError(FileNotFoundError):
  """The workdir has no complete checkpoint to load."""


def parse_mesh(text: str) -> dict[str, int]:
  """`data=2,tensor=4` -> {"data": 2, "tensor": 4} (axes left out are 1; one size may be -1 = the rest)."""
  shape = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, eq, size = part.partition("=")
    axis = axis.strip()
    if not eq or axis not in sharding.MESH_AXES or not re.fullmatch(r"-?[0-9]+", size.strip()) or axis in shape:
      raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                       f"{'/'.join(sharding.MESH_AXES)} at most once each, e.g. data=2,tensor=4")
    shape[axis] = int(size)
  return shape


def default_mesh_shape(config: config_lib.FaceLLMConfig, num_devices: int) -> dict[str, int]:
  """Every device: tensor parallel as wide as divides both the device count and the query and kv
  heads (so the KV cache splits over heads), data parallel over the rest."""
  heads = math.gcd(config.text.num_attention_heads, config.text.num_key_value_heads)
  tensor = max(t for t in range(1, num_devices + 1) if num_devices % t == 0 and heads % t == 0)
  return {"data": num_devices // tensor, "fsdp": 1, "tensor": tensor}


def inference_mesh(config: config_lib.FaceLLMConfig, shape: Mapping[str, int] | str | None = None,
                   devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh inference runs on: `shape` (or `default_mesh_shape`) over `devices` (default: this
  process's). `tensor` must divide the language model's query and kv heads, so attention and the
  KV cache split by whole heads; anything else is a one-line `ShardingError`."""
  devices = list(jax.local_devices() if devices is None else devices)
  if isinstance(shape, str):
    shape = parse_mesh(shape)
  mesh = sharding.make_mesh(default_mesh_shape(config, len(devices)) if shape is None else shape, devices)
  t, text = mesh.shape["tensor"], config.text
  if text.num_attention_heads % t or text.num_key_value_heads % t:
    raise sharding.ShardingError(
        f"mesh tensor={t} does not divide the model's {text.num_attention_heads} query / "
        f"{text.num_key_value_heads} kv heads; pick a tensor size that divides both "
        f"(default here: {default_mesh_shape(config, len(devices))})")
  return mesh


def read_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved training config a run wrote to `workdir/config.json`."""
  workdir = paths.check_input_dir(workdir, "--workdir")
  path = workdir / "config.json"
  if not path.exists():
    raise NoCheckpointError(f"{path} is missing: {workdir} is not a training workdir (train with "
                            "`python -m facellm_jax.train --workdir=...` first)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from e


def _manager(workdir: str | os.PathLike) -> ocp.CheckpointManager:
  """A read-only view of the workdir's checkpoints; raises when none is complete."""
  directory = paths.path(workdir) / "checkpoints"
  if directory.is_dir():
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only manager is read-only.
    try:
      manager = ocp.CheckpointManager(directory, item_names=("params", "meta"), options=options)
    finally:
      logging.set_verbosity(verbosity)
    if manager.latest_step() is not None:
      return manager
  raise NoCheckpointError(f"no complete checkpoint in {directory}: train first, or wait until the run has "
                          "saved one (checkpoint.every_steps)")


def latest_step(workdir: str | os.PathLike) -> int:
  """The newest committed checkpoint step of a training workdir."""
  return _manager(workdir).latest_step()


def check_step(workdir: str | os.PathLike, step: int | None) -> int:
  """`step` (default: the newest) if it is a committed checkpoint step of the workdir, else a
  one-line `NoCheckpointError` listing the ones there are."""
  manager = _manager(workdir)
  steps = sorted(manager.all_steps())
  if step is None:
    return steps[-1]
  if step not in steps:
    raise NoCheckpointError(f"--step {step}: no complete checkpoint for that step in {manager.directory}; "
                            f"complete steps: {steps}")
  return step


def tokenizer_path(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
  """Where the run took its tokenizer from (as `training.loop` does, without training one), as a
  local folder: a workdir's tokenizer/ on GCS is downloaded first."""
  path = cfg.get("tokenizer", {}).get("path", "") or cfg.model.get("hf_checkpoint", "")
  return Path(path) if path else paths.local_copy(paths.path(workdir) / "tokenizer")


def restore_workdir(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None, *,
                    step: int | None = None, mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[FaceLLM, config_lib.FaceLLMConfig, lora_lib.LoRAConfig | None]:
  """The trained model of a workdir as training held it (float32 params, LoRA unmerged).

  Returns the model, its architecture and the LoRA config (None when the run was not LoRA).
  `cfg` defaults to the workdir's config.json; `step` to the latest intact one; `mesh` to
  `inference_mesh`'s default.
  """
  model, mc, lora, _ = _restore_workdir(workdir, cfg, step=step, mesh=mesh)
  return model, mc, lora


def _restore_workdir(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict | None, *, step: int | None,
                     mesh: jax.sharding.Mesh | None
                     ) -> tuple[FaceLLM, config_lib.FaceLLMConfig, lora_lib.LoRAConfig | None, int]:
  workdir = paths.path(workdir)
  cfg = read_workdir_config(workdir) if cfg is None else cfg
  manager = _manager(workdir)
  steps = manager.all_steps() if step is None else [check_step(workdir, step)]
  mc = loop.model_config(cfg)
  mesh = inference_mesh(mc) if mesh is None else mesh
  trainable = cfg.train.trainable
  expected = {"model": json.loads(json.dumps(config_lib.to_config_dict(mc))), "trainable": trainable}
  lora = loop.lora_config(cfg)
  wrt = lora_lib.trainable_filter(trainable)
  model = _abstract(mc, lora, DTYPES[cfg.train.compute_dtype], scan_layers=cfg.train.get("scan_layers", False))
  if jax.tree.leaves(nnx.state(model, nnx.Not(wrt))):
    # Part of the model did not train: rebuild it as training did (HF weights or the seeded init), on the mesh.
    model = loop.build_model(cfg, mc, mesh)
  trained = nnx.state(model, wrt)
  # Each device reads only its own slices of the trained params (the rules' shardings on the mesh).
  target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        nnx.to_pure_dict(trained), nnx.to_pure_dict(sharding.state_shardings(trained, mesh)))

  def attempt(s: int):
    meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    found = {k: meta.get(k) for k in expected}
    if found != expected:
      raise ckpt_lib.CheckpointMismatchError(
          f"checkpoint {manager.directory / str(s)} was trained as {found['trainable']!r} with model "
          f"{found['model']}, but the config says {trainable!r} with {expected['model']}; pass the config "
          "the run was trained with")
    return manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]

  step, params = ckpt_lib.restore_first_intact(manager.directory, steps, attempt, set_aside=False)
  nnx.replace_by_pure_dict(trained, params)
  nnx.update(model, trained)
  return stack.unstack(model), mc, lora, step  # the checkpoint's layout -> inference's unrolled one


def _abstract(config: config_lib.FaceLLMConfig, lora: lora_lib.LoRAConfig | None, dtype,
              param_dtype=jnp.float32, *, scan_layers: bool = False) -> FaceLLM:
  """The model's shapes only (no weights): `dtype` compute, `param_dtype` params, float32 adapters;
  `scan_layers`: the stacked layout a `train.scan_layers` run checkpoints."""

  def build() -> FaceLLM:
    rngs = nnx.Rngs(0)
    model = FaceLLM(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    model = model if lora is None else lora_lib.apply_lora(model, lora, rngs)
    return stack.stack(model) if scan_layers else model

  return nnx.eval_shape(build)


def cast(model: FaceLLM, config: config_lib.FaceLLMConfig, dtype, lora: lora_lib.LoRAConfig | None = None) -> FaceLLM:
  """The same weights as a model whose params and compute are `dtype` (adapters stay float32).

  `lora` must describe the adapters `model` carries (None once merged): the target graph is
  rebuilt abstractly with them and the weights are copied over, cast.
  """

  graphdef, target = nnx.split(_abstract(config, lora, dtype, dtype))
  source = nnx.to_pure_dict(nnx.state(model))
  values = jax.tree.map(lambda like, x: jnp.asarray(x, like.dtype), nnx.to_pure_dict(target), source)
  nnx.replace_by_pure_dict(target, values)
  return nnx.merge(graphdef, target)


@dataclasses.dataclass
class Loaded:
  """A model ready for inference on `mesh`; `step` is the checkpoint step restored (None for `--hf`)."""
  model: FaceLLM
  config: config_lib.FaceLLMConfig
  tokenizer: tok_lib.Tokenizer
  step: int | None
  mesh: jax.sharding.Mesh | None = None


def load_for_inference(workdir: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None, *,
                       config: ml_collections.ConfigDict | None = None, dtype=jnp.float32, merge_lora: bool = True,
                       step: int | None = None, mesh: jax.sharding.Mesh | Mapping[str, int] | str | None = None
                       ) -> tuple[FaceLLM, config_lib.FaceLLMConfig, tok_lib.Tokenizer]:
  """(model, model config, tokenizer) from exactly one of a training workdir or a HF directory.

  Args:
    workdir: a training workdir (local or `gs://`); its latest intact checkpoint (or `step`) is loaded.
    hf_dir: a local HF `InternVL*-hf` directory (config.json, safetensors, tokenizer.json).
    config: the training config, instead of the workdir's config.json.
    dtype: params and compute dtype (jnp.float32 or jnp.bfloat16, or their names).
    merge_lora: fold a LoRA run's adapters into the base weights (faster, same outputs).
    step: a checkpoint step other than the latest.
    mesh: a Mesh, or its shape (`{"tensor": 4}`, "data=2,tensor=2") over this process's devices;
      default `default_mesh_shape` (see `inference_mesh`).
  """
  loaded = load_checkpoint(workdir, hf_dir, config=config, dtype=dtype, merge_lora=merge_lora, step=step, mesh=mesh)
  return loaded.model, loaded.config, loaded.tokenizer


def load_checkpoint(workdir: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None, *,
                    config: ml_collections.ConfigDict | None = None, dtype=jnp.float32, merge_lora: bool = True,
                    step: int | None = None, mesh: jax.sharding.Mesh | Mapping[str, int] | str | None = None
                    ) -> Loaded:
  """`load_for_inference`, also saying which checkpoint step it restored and on which mesh."""
  if (workdir is None) == (hf_dir is None):
    raise ValueError("pass exactly one of a training workdir or a HF checkpoint directory")
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dtype = DTYPES[dtype]
  if hf_dir is not None:
    if paths.is_remote(hf_dir):
      raise ValueError(f"--hf {hf_dir}: a HF checkpoint is read from a local folder; copy it with "
                       f"`gcloud storage cp -r {hf_dir} DIR` (or use a gcsfuse mount)")
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
      raise FileNotFoundError(f"HF checkpoint directory {hf_dir} does not exist")
    mc = hf.read_config(hf_dir)
    mesh = _as_mesh(mc, mesh)
    shardings = sharding.state_shardings(hf.abstract_model(mc, dtype, dtype), mesh)
    model, mc = hf.load_pretrained(hf_dir, dtype, compute_dtype=dtype, shardings=shardings)
    return _checked(Loaded(model, mc, tok_lib.load_tokenizer(hf_dir), None, mesh))
  cfg = read_workdir_config(workdir) if config is None else config
  mesh = _as_mesh(loop.model_config(cfg), mesh)
  model, mc, lora, step = _restore_workdir(workdir, cfg, step=step, mesh=mesh)
  if lora is not None and merge_lora:
    lora_lib.merge_lora(model)
    lora = None
  tokenizer = tok_lib.load_tokenizer(tokenizer_path(cfg, workdir))
  # The eager merge and cast let XLA pick their outputs' layout: put them back by the rules.
  model = sharding.shard_model(cast(model, mc, dtype, lora), mesh)
  return _checked(Loaded(model, mc, tokenizer, step, mesh))


def _as_mesh(config: config_lib.FaceLLMConfig, mesh) -> jax.sharding.Mesh:
  return mesh if isinstance(mesh, jax.sharding.Mesh) else inference_mesh(config, mesh)


def _checked(loaded: Loaded) -> Loaded:
  """Fails fast when a large weight ended up whole on every device of a model-parallel mesh."""
  sharding.assert_sharded(nnx.state(loaded.model, nnx.Param), loaded.mesh)
  return loaded


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> `get_config(arg)`, as `--config` reads it for training."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise FileNotFoundError(f"config file {path} not found; expected e.g. configs/tiny.py[:lora]")
  module_spec = importlib.util.spec_from_file_location(f"_facellm_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config(arg=None)")
  return module.get_config(arg or None)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line on stderr and exit code 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see --help)\n")


def add_model_args(parser: argparse.ArgumentParser, *, hf: bool = True) -> None:
  """--workdir / --hf / --config / --step / --dtype, shared by the inference CLIs."""
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training workdir (a folder or gs:// URL): its latest intact checkpoint "
                                        "is loaded")
  if hf:
    source.add_argument("--hf", help="local HF InternVL directory (config.json, safetensors, tokenizer.json)")
  parser.add_argument("--config", help="the run's training config file[:arg] (default: WORKDIR/config.json)")
  parser.add_argument("--step", type=int, help="checkpoint step to load (default: the latest complete one)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="params and compute dtype")
  parser.add_argument("--mesh", type=mesh_arg, default=None,
                      help="device mesh of this process, e.g. data=2,tensor=4 (axes left out are 1, one may be "
                           "-1 = the rest; default: every local device, tensor parallel as wide as the heads "
                           "divide, data parallel over the rest)")


def load_from_args(args: argparse.Namespace, *, merge_lora: bool = True
                   ) -> tuple[FaceLLM, config_lib.FaceLLMConfig, tok_lib.Tokenizer]:
  loaded = load_model(args, merge_lora=merge_lora)
  return loaded.model, loaded.config, loaded.tokenizer


def load_model(args: argparse.Namespace, *, merge_lora: bool = True) -> Loaded:
  """The model the CLI flags of `add_model_args` name, with the step it came from."""
  config = load_config_file(args.config) if args.config else None
  return load_checkpoint(args.workdir, getattr(args, "hf", None), config=config, dtype=args.dtype,
                         merge_lora=merge_lora, step=args.step, mesh=args.mesh)


def mesh_arg(text: str) -> dict[str, int]:
  """argparse type of `--mesh`: `parse_mesh` with argparse's one-line usage error."""
  try:
    return parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e).removeprefix(f"--mesh {text!r}: ")) from None
