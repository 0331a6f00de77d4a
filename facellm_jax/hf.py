"""Import and export of HuggingFace `InternVLForConditionalGeneration` checkpoints (safetensors only).

Original-layout `InternVLChatModel` directories load too, through `hf_original` in front of the table.

The mapping is one table: a regex on the HF key -> our NNX parameter path + a layout transform.
Loading fills an `nnx.eval_shape` skeleton and reports every mismatch in one error. The scanned
layout (`train.scan_layers`) goes through the same table: a per-layer path `....layers.{i}....`
is slice i of the stacked Variable `models.stack.stacked_path` names, on import and export.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.flax import save_file

from facellm_jax import hf_original
from facellm_jax.models import stack
from facellm_jax.models.config import FaceLLMConfig, from_hf_dict, to_hf_dict
from facellm_jax.models.facellm import FaceLLM

_V = "vision_tower.encoder.layer.{0}."
_L = "language_model.model.layers.{0}."

# (HF on-disk name, our NNX path, transform); `{i}` are wildcards shared by both sides.
# First match wins. Transforms: "linear" [out,in] <-> [in,out]; "conv" [D,C,p,p] <-> [p,p,C,D];
# "flat" drops HF's leading singleton dims; "same".
MAPPING: list[tuple[str, str, str]] = [
    ("vision_tower.embeddings.cls_token", "vision.cls_token", "flat"),
    ("vision_tower.embeddings.position_embeddings", "vision.pos_embed", "flat"),
    ("vision_tower.embeddings.patch_embeddings.projection.weight", "vision.patch_kernel", "conv"),
    ("vision_tower.embeddings.patch_embeddings.projection.bias", "vision.patch_bias", "same"),
    (_V + "lambda_1", "vision.layers.{0}.scale1", "same"),
    (_V + "lambda_2", "vision.layers.{0}.scale2", "same"),
    (_V + "attention.projection_layer.weight", "vision.layers.{0}.attn.out_proj.kernel", "linear"),
    (_V + "attention.projection_layer.bias", "vision.layers.{0}.attn.out_proj.bias", "same"),
    (_V + "attention.{1}_proj.weight", "vision.layers.{0}.attn.{1}_proj.kernel", "linear"),
    (_V + "attention.{1}_proj.bias", "vision.layers.{0}.attn.{1}_proj.bias", "same"),
    (_V + "attention.{1}_norm.weight", "vision.layers.{0}.attn.{1}_norm.scale", "same"),
    (_V + "mlp.fc{1}.weight", "vision.layers.{0}.fc{1}.kernel", "linear"),
    (_V + "mlp.fc{1}.bias", "vision.layers.{0}.fc{1}.bias", "same"),
    (_V + "layernorm_before.weight", "vision.layers.{0}.norm1.scale", "same"),
    (_V + "layernorm_before.bias", "vision.layers.{0}.norm1.bias", "same"),
    (_V + "layernorm_after.weight", "vision.layers.{0}.norm2.scale", "same"),
    (_V + "layernorm_after.bias", "vision.layers.{0}.norm2.bias", "same"),
    ("multi_modal_projector.layer_norm.weight", "projector.norm.scale", "same"),
    ("multi_modal_projector.layer_norm.bias", "projector.norm.bias", "same"),
    ("multi_modal_projector.linear_{0}.weight", "projector.linear_{0}.kernel", "linear"),
    ("multi_modal_projector.linear_{0}.bias", "projector.linear_{0}.bias", "same"),
    ("language_model.model.embed_tokens.weight", "language.embed", "same"),
    (_L + "self_attn.{1}_proj.weight", "language.layers.{0}.attn.{1}_proj.kernel", "linear"),
    (_L + "self_attn.{1}_proj.bias", "language.layers.{0}.attn.{1}_proj.bias", "same"),
    (_L + "self_attn.{1}_norm.weight", "language.layers.{0}.attn.{1}_norm.scale", "same"),
    (_L + "mlp.{1}_proj.weight", "language.layers.{0}.mlp.{1}_proj.kernel", "linear"),
    (_L + "input_layernorm.weight", "language.layers.{0}.input_norm.scale", "same"),
    (_L + "post_attention_layernorm.weight", "language.layers.{0}.post_attn_norm.scale", "same"),
    ("language_model.model.norm.weight", "language.norm.scale", "same"),
    ("language_model.lm_head.weight", "language.lm_head", "linear"),
]
_LM_HEAD = "language_model.lm_head.weight"


def _regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(r"\{0\}", r"([^.]+)").replace(r"\{1\}", r"([^.]+)") + "$")


_FORWARD = [(_regex(hf), ours, t) for hf, ours, t in MAPPING]
_BACKWARD = [(_regex(ours), hf, t) for hf, ours, t in MAPPING]


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model its config describes."""


def canonical_key(key: str) -> str:
  """transformers >= 5 in-memory names -> the on-disk names the `-hf` checkpoints use."""
  for new, old in (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("model.language_model.", "language_model.model.")):
    if key.startswith(new):
      return old + key[len(new):]
  return _LM_HEAD if key == "lm_head.weight" else key


def _translate(table, name: str) -> tuple[str, str] | None:
  for pattern, template, transform in table:
    m = pattern.match(name)
    if m:
      return template.format(*m.groups()), transform
  return None


def _to_ours(x, transform: str, shape: tuple[int, ...]):
  if transform == "linear":
    x = x.T
  elif transform == "conv":
    x = x.transpose(2, 3, 1, 0)
  elif transform == "flat":
    x = x.reshape(shape)
  return x


def _to_hf(x, transform: str):
  if transform == "linear":
    return x.T
  if transform == "conv":
    return x.transpose(3, 2, 0, 1)
  if transform == "flat":
    return x[None] if x.ndim == 2 else x[None, None]
  return x


def _safetensor_files(path: Path) -> list[Path]:
  index = path / "model.safetensors.index.json"
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [path / s for s in shards]
  single = path / "model.safetensors"
  if single.exists():
    return [single]
  if any(path.glob("*.bin")) or any(path.glob("*.pt")):
    raise FileNotFoundError(f"{path} holds only pickle weights (.bin/.pt); convert them to safetensors first")
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_config(path: str | Path) -> FaceLLMConfig:
  path = Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"{path} is not a HF checkpoint directory: config.json is missing")
  d = json.loads(cfg_file.read_text())
  return from_hf_dict(hf_original.hf_config(d, path) if hf_original.is_original(d) else d)


def abstract_model(config: FaceLLMConfig, dtype=jnp.float32, compute_dtype=None, *,
                   scan_layers: bool = False) -> FaceLLM:
  def build() -> FaceLLM:
    model = FaceLLM(config, rngs=nnx.Rngs(0), dtype=compute_dtype or dtype, param_dtype=dtype)
    return stack.stack(model) if scan_layers else model

  return nnx.eval_shape(build)


@functools.partial(jax.jit, donate_argnums=0)
def _set_slice(stacked: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
  """`stacked[index] = x`, in place (the stacked buffer is donated): one layer of a scanned load."""
  return jax.lax.dynamic_update_index_in_dim(stacked, x.astype(stacked.dtype), index, 0)


def load_pretrained(path: str | Path, dtype=jnp.float32, *, compute_dtype=None, shardings: Any = None,
                    scan_layers: bool = False) -> tuple[FaceLLM, FaceLLMConfig]:
  """Reads a HF InternVL directory, `-hf` or original layout (told apart by config.json), into a
  FaceLLM with `dtype` parameters (`scan_layers`: in the stacked layout of `models.stack`).

  `shardings`, if given, is a state-shaped tree of `NamedSharding`s (see `models.sharding`);
  each tensor goes straight to its shards, so the full model never sits on one device (a
  stacked Variable is allocated sharded and each layer's slice written into it in place).
  """
  path = Path(path)
  config = read_config(path)
  original = hf_original.is_original(json.loads((path / "config.json").read_text()))
  model = abstract_model(config, dtype, compute_dtype, scan_layers=scan_layers)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  want = {".".join(map(str, k)): v for k, v in flat.items()}
  flat_shardings = None
  if shardings is not None:
    flat_shardings = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(shardings)}
  loaded: dict[str, jax.Array] = {}
  slices: dict[str, set[int]] = {}  # stacked Variable -> the layers written so far
  unexpected, wrong_shape = [], []
  for file in _safetensor_files(path):
    with safe_open(str(file), framework="flax") as f:
      f = hf_original.HFView(f, config.vision.hidden_size) if original else f  # the original layout, -hf names
      for raw_key in f.keys():
        key = canonical_key(raw_key)
        mapped = _translate(_FORWARD, key)
        if key == _LM_HEAD and config.text.tie_word_embeddings:
          continue  # tied: the embedding is the head
        target, index = (mapped[0], None) if mapped else (None, None)
        if mapped and target not in want and stack.stacked_path(target):
          target, index = stack.stacked_path(target)
        if target not in want or (index is not None and index >= want[target].shape[0]):
          unexpected.append(raw_key)
          continue
        transform = mapped[1]
        var = want[target]
        shape = tuple(var.shape) if index is None else tuple(var.shape[1:])
        x = f.get_tensor(raw_key)
        hf_shape = _to_hf(np.empty(shape, np.uint8), transform).shape
        if tuple(x.shape) != tuple(hf_shape):
          wrong_shape.append(f"{raw_key}: checkpoint {tuple(x.shape)}, model expects {tuple(hf_shape)}")
          continue
        x = _to_ours(x, transform, shape).astype(dtype)
        sharding = None if flat_shardings is None else flat_shardings[target]
        if index is None:
          loaded[target] = x if sharding is None else jax.device_put(x, sharding)
          continue
        if target not in loaded:
          loaded[target] = jnp.zeros(var.shape, dtype, device=sharding)
          slices[target] = set()
        if sharding is not None:
          x = jax.device_put(x, NamedSharding(sharding.mesh, P(*sharding.spec[1:])))
        loaded[target] = _set_slice(loaded[target], x, jnp.int32(index))
        slices[target].add(index)
  missing = sorted(set(want) - set(loaded))
  missing += sorted(stack.unrolled_path(t, i) for t, done in slices.items()
                    for i in range(want[t].shape[0]) if i not in done)
  if missing or unexpected or wrong_shape:
    lines = [f"checkpoint {path} does not fit the model described by its config.json:"]
    lines += [f"  missing: {m}" for m in missing]
    lines += [f"  unexpected: {u}" for u in unexpected]
    lines += [f"  wrong shape: {w}" for w in wrong_shape]
    raise CheckpointMismatchError("\n".join(lines))
  for key, var in flat.items():
    var.set_value(loaded[".".join(map(str, key))])
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), config


def export_state(model: FaceLLM) -> dict[str, jax.Array]:
  """HF on-disk key -> tensor, for every parameter (LoRA must be merged first), in either layout."""
  out = {}
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(map(str, key))
    if isinstance(var, nnx.LoRAParam) or "lora" in key:
      raise ValueError("merge LoRA into the base weights (models.lora.merge_lora) before exporting")
    value = var.get_value()
    layers = [(name, None)] if stack.unrolled_path(name, 0) is None else \
        [(stack.unrolled_path(name, i), i) for i in range(value.shape[0])]
    for layer_name, i in layers:
      hf_key, transform = _translate(_BACKWARD, layer_name)
      out[hf_key] = _to_hf(value if i is None else value[i], transform)
  return out


def save_pretrained(model: FaceLLM, config: FaceLLMConfig, out_dir: str | Path,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
  """Writes config.json + safetensors (sharded with an index when large) that transformers loads."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.asarray(jax.device_get(v)) for k, v in export_state(model).items()}
  dtypes = {str(v.dtype) for v in tensors.values()}
  hf_cfg = to_hf_dict(config)
  hf_cfg["torch_dtype"] = "bfloat16" if dtypes == {"bfloat16"} else "float32"
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(tensors):
    nbytes = tensors[key].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = tensors[key]
    size += nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file({k: jnp.asarray(v) for k, v in shards[0].items()}, str(out / "model.safetensors"), metadata=meta)
    return out
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({k: jnp.asarray(v) for k, v in shard.items()}, str(out / name), metadata=meta)
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
  (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return out
