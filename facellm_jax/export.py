"""Entry point: `python -m facellm_jax.export --workdir W --out DIR [--dtype bfloat16] [--orbax DIR2]`.

Turns a training run into a model other tools serve. LoRA adapters are merged into the base
weights first, so both outputs are plain InternVL3 weights:

- `--out DIR`: a HF `InternVLForConditionalGeneration` directory: config.json, safetensors,
  the tokenizer (tokenizer.json, tokenizer_config.json with the chat template, ...),
  generation_config.json (the end-of-turn stop tokens) and the image processor's
  preprocessor_config.json, so `transformers` loads it and generates with it.
- `--orbax DIR2`: a standalone Orbax checkpoint of the merged params (`DIR2/params`) with the
  model's config.json and tokenizer beside it, for JAX serving without the training workdir:
  `model, config, tokenizer = facellm_jax.export.restore_orbax(DIR2)`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from facellm_jax import hf
from facellm_jax.inference import answer, load
from facellm_jax.input import image as image_lib
from facellm_jax.input import tokenizer as tok_lib
from facellm_jax.models import config as config_lib
from facellm_jax.models.facellm import FaceLLM

# What a HF tokenizer directory may hold; those present are copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _check_empty(path: Path, flag: str) -> None:
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"{flag} {path} already exists and is not an empty folder; choose a new folder "
                          "(an export never overwrites files)")


def write_tokenizer(source: str | os.PathLike, out: Path) -> None:
  """Copies the tokenizer files; adds the ChatML chat template when the source has none."""
  source = Path(source)
  source = source.parent if source.is_file() else source
  for name in TOKENIZER_FILES:
    if (source / name).is_file():
      shutil.copyfile(source / name, out / name)
  config_file = out / "tokenizer_config.json"
  has_template = (out / "chat_template.jinja").exists() or (out / "chat_template.json").exists() or (
      config_file.exists() and "chat_template" in json.loads(config_file.read_text()))
  if not has_template:
    (out / "chat_template.jinja").write_text(tok_lib.CHAT_TEMPLATE)


def write_hf_extras(config: config_lib.FaceLLMConfig, tokenizer: tok_lib.Tokenizer, out: Path,
                    base: str | os.PathLike | None = None) -> None:
  """generation_config.json with our stop tokens, and the image processor's configs (the base
  checkpoint's when the run started from one, else InternVL's at this image size)."""
  generation = {"eos_token_id": list(answer.eos_ids(tokenizer)), "pad_token_id": tokenizer.pad_id,
                "do_sample": False}
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  base = Path(base) if base else None
  if base is not None and all((base / name).is_file() for name in PROCESSOR_FILES):
    for name in PROCESSOR_FILES:
      shutil.copyfile(base / name, out / name)
    return
  size = config.vision.image_size
  preprocessor = {
      "image_processor_type": "GotOcr2ImageProcessor", "processor_class": "InternVLProcessor",
      "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,  # PIL bicubic
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(image_lib.IMAGENET_MEAN), "image_std": list(image_lib.IMAGENET_STD),
      "do_convert_rgb": True, "crop_to_patches": False, "min_patches": 1, "max_patches": 12}
  processor = {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}
  (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
  (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def save_orbax(model: FaceLLM, config: config_lib.FaceLLMConfig, tokenizer_source: str | os.PathLike,
               out: str | os.PathLike) -> Path:
  """`out/params` (Orbax, the merged params as a nested dict), `out/config.json` (HF format) and the
  tokenizer files: everything `restore_orbax` needs."""
  out = Path(out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
  hf_config = config_lib.to_hf_dict(config)
  hf_config["torch_dtype"] = "bfloat16" if dtypes == {"bfloat16"} else "float32"
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  write_tokenizer(tokenizer_source, out)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out / "params", params)
  return out


def restore_orbax(path: str | os.PathLike, dtype=None) -> tuple[FaceLLM, config_lib.FaceLLMConfig, tok_lib.Tokenizer]:
  """(model, config, tokenizer) from a `--orbax` export, params restored straight into `dtype`
  (default: as exported) on the default device."""
  path = Path(path).resolve()
  if not (path / "params").is_dir():
    raise FileNotFoundError(f"{path} is not an Orbax export: params/ is missing (write one with "
                            "`python -m facellm_jax.export --workdir W --out DIR --orbax {path}`)")
  config = hf.read_config(path)
  if dtype is None:
    dtype = jnp.bfloat16 if json.loads((path / "config.json").read_text()).get("torch_dtype") == "bfloat16" \
        else jnp.float32
  graphdef, abstract = nnx.split(hf.abstract_model(config, dtype, dtype))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(abstract))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path / "params", target)
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract), config, tok_lib.load_tokenizer(path)


def export(args) -> None:
  """The export behind the CLI."""
  out = Path(args.out)
  _check_empty(out, "--out")
  if args.orbax:
    _check_empty(Path(args.orbax), "--orbax")
  cfg = load.load_config_file(args.config) if args.config else load.read_workdir_config(args.workdir)
  model, config, tokenizer = load.load_from_args(args, merge_lora=True)
  source = load.tokenizer_path(cfg, args.workdir)
  hf.save_pretrained(model, config, out)
  write_tokenizer(source, out)
  write_hf_extras(config, tokenizer, out, cfg.model.get("hf_checkpoint", "") or None)
  print(f"HF checkpoint: {out}")
  if args.orbax:
    print(f"Orbax checkpoint: {save_orbax(model, config, source, args.orbax)}")


def main(argv: list[str] | None = None) -> int:
  parser = load.ArgumentParser(prog="python -m facellm_jax.export", description=__doc__.split("\n\n")[1])
  load.add_model_args(parser, hf=False)
  parser.add_argument("--out", required=True, help="new folder for the HF InternVL checkpoint")
  parser.add_argument("--orbax", help="new folder for a standalone Orbax checkpoint of the merged params")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    export(args)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
