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

The model loads on `--mesh` (as `evaluate` and `chat` do: default every local device), so a
model too large for one chip exports too. `--workdir`, `--out` and `--orbax` may be `gs://` URLs. Both outputs are checked (a new or empty
folder we may write) before the model loads, and each is written into a local stage that becomes
the output only when complete (`paths.staged_dir`), so a failed export leaves no half folder and
the same command can simply be run again.
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
from facellm_jax import paths
from facellm_jax.inference import answer, load
from facellm_jax.input import image as image_lib
from facellm_jax.input import tokenizer as tok_lib
from facellm_jax.models import config as config_lib
from facellm_jax.models import sharding
from facellm_jax.models.facellm import FaceLLM

# What a HF tokenizer directory may hold; those present are copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


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
               out: str | os.PathLike) -> paths.Path:
  """`out/params` (Orbax, the merged params as a nested dict), `out/config.json` (HF format) and the
  tokenizer files: everything `restore_orbax` needs. `out` (local or `gs://`) appears complete
  or not at all."""
  out = paths.path(out)
  with paths.staged_dir(out, last="config.json") as stage:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    hf_config = config_lib.to_hf_dict(config)
    hf_config["torch_dtype"] = "bfloat16" if dtypes == {"bfloat16"} else "float32"
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(stage / "params", params)
    write_tokenizer(tokenizer_source, stage)
    (stage / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return out


def restore_orbax(path: str | os.PathLike, dtype=None, mesh: jax.sharding.Mesh | dict | str | None = None
                  ) -> tuple[FaceLLM, config_lib.FaceLLMConfig, tok_lib.Tokenizer]:
  """(model, config, tokenizer) from a `--orbax` export (local or `gs://`), params restored
  straight into `dtype` (default: as exported) and into their shardings on `mesh` (a Mesh or
  its shape, default `load.inference_mesh`'s): each device reads only its own slices."""
  path = paths.path(path)
  if not (path / "params").is_dir() or not (path / "config.json").exists():
    raise FileNotFoundError(f"{path} is not an Orbax export: params/ or config.json is missing (write one with "
                            f"`python -m facellm_jax.export --workdir W --out DIR --orbax {path}`)")
  hf_config = json.loads((path / "config.json").read_text())
  config = config_lib.from_hf_dict(hf_config)
  if dtype is None:
    dtype = jnp.bfloat16 if hf_config.get("torch_dtype") == "bfloat16" else jnp.float32
  graphdef, abstract = nnx.split(hf.abstract_model(config, dtype, dtype))
  mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else load.inference_mesh(config, mesh)
  target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), nnx.to_pure_dict(abstract),
                        nnx.to_pure_dict(sharding.state_shardings(abstract, mesh)))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path / "params", target)
  nnx.replace_by_pure_dict(abstract, params)
  tokenizer = tok_lib.load_tokenizer(paths.local_copy(path, only=TOKENIZER_FILES))
  return nnx.merge(graphdef, abstract), config, tokenizer


def check_outputs(args) -> tuple[paths.Path, paths.Path | None]:
  """Both output folders, checked before anything loads or is written (the flag named in the error)."""
  out = paths.check_output_dir(args.out, "--out", empty=True)
  orbax = paths.check_output_dir(args.orbax, "--orbax", empty=True) if args.orbax else None
  if orbax is not None:
    a, b = os.fspath(out).rstrip("/") + "/", os.fspath(orbax).rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
      raise ValueError(f"--out {out} and --orbax {orbax} must be two separate folders")
  return out, orbax


def export(args) -> None:
  """The export behind the CLI."""
  out, orbax = check_outputs(args)
  cfg = load.load_config_file(args.config) if args.config else load.read_workdir_config(args.workdir)
  model, config, tokenizer = load.load_from_args(args, merge_lora=True)
  source = load.tokenizer_path(cfg, args.workdir)
  with paths.staged_dir(out, last="config.json") as stage:
    hf.save_pretrained(model, config, stage)
    write_tokenizer(source, stage)
    write_hf_extras(config, tokenizer, stage, cfg.model.get("hf_checkpoint", "") or None)
  print(f"HF checkpoint: {out}")
  if orbax is not None:
    print(f"Orbax checkpoint: {save_orbax(model, config, source, orbax)}")


def main(argv: list[str] | None = None) -> int:
  parser = load.ArgumentParser(prog="python -m facellm_jax.export", description=__doc__.split("\n\n")[1])
  load.add_model_args(parser, hf=False)
  parser.add_argument("--out", required=True, help="new folder (or gs:// URL) for the HF InternVL checkpoint")
  parser.add_argument("--orbax", help="new folder (or gs:// URL) for a standalone Orbax checkpoint of the "
                                      "merged params")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    export(args)
  except (OSError, ValueError) as e:
    print(f"error: {paths.one_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
