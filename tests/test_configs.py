"""The config files: the official architectures (counted against transformers), the paper's recipe,
variants and overrides, and a tiny config that really runs."""

import dataclasses
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from flax import nnx
from ml_collections import config_flags

from facellm_jax import hf
from facellm_jax.input import tokenizer as tok_lib
from facellm_jax.models import config as config_lib
from facellm_jax.models import sharding
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.training import validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SIZES = sorted(p.stem for p in CONFIGS.glob("internvl*.py"))
ALL = SIZES + ["tiny"]
TRAINABLE = ("lora", "full", "all_but_vision")

# Parameters of each released model as transformers' InternVLForConditionalGeneration counts them
# (a tied weight once). Twice each is the bf16 size on the Hub: InternVL3-1B 1.88 GB, -2B 4.18 GB,
# -8B-hf 15.9 GB, -14B 30.2 GB, InternVL3_5-1B 2.12 GB, -8B 17.1 GB; a tied head would miss them.
# (No size of the 38B release could be read here.)
EXPECTED_PARAMS = {
    "internvl3_1b": 938_193_024,
    "internvl3_2b": 2_088_957_440,
    "internvl3_8b": 7_944_373_760,
    "internvl3_14b": 15_117_256_704,
    "internvl3_38b": 38_388_164_992,
    "internvl3_5_1b": 1_060_897_792,
    "internvl3_5_8b": 8_528_318_464,
}
PAPER_SIZES = ("internvl3_1b", "internvl3_8b", "internvl3_38b")  # FaceLLM-1B/8B/38B
FAIRFACEGPT_EXAMPLES = 87_632


def load(name: str, arg: str | None = None):
  """`get_config(arg)` of configs/<name>.py, loaded by path as `--config=` does."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_flags(argv: list[str]):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def test_every_size_has_a_config():
  assert set(EXPECTED_PARAMS) == set(SIZES)


@pytest.mark.parametrize("name", SIZES)
def test_param_count_equals_transformers(name):
  config = config_lib.from_config_dict(load(name).model)
  model = hf.abstract_model(config)
  ours = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with torch.device("meta"):
    reference = transformers.InternVLForConditionalGeneration(
        transformers.InternVLConfig(**config_lib.to_hf_dict(config)))
  theirs = sum(p.numel() for p in reference.parameters())  # shared tensors once
  assert ours == theirs == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_model_block_is_exactly_the_model_config(name):
  model = load(name).model
  assert set(model.vision) == _fields(config_lib.VisionConfig)
  assert set(model.text) == _fields(config_lib.TextConfig)
  assert set(model) == _fields(config_lib.FaceLLMConfig) | {"hf_checkpoint"}
  config = config_lib.from_config_dict(model)
  assert config_lib.from_hf_dict(config_lib.to_hf_dict(config)) == config
  assert 0 <= config.image_token_id < config.text.vocab_size


def test_internvl3_1b_is_the_released_architecture():
  c = config_lib.from_config_dict(load("internvl3_1b").model)
  assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.num_key_value_heads) == (896, 24, 2)
  assert (c.text.vocab_size, c.image_token_id, c.text.tie_word_embeddings) == (151674, 151667, False)
  assert (c.vision.hidden_size, c.vision.norm_type, c.image_seq_length) == (1024, "layer_norm", 256)
  big = config_lib.from_config_dict(load("internvl3_38b").model).vision
  assert (big.hidden_size, big.num_hidden_layers, big.norm_type, big.use_qk_norm,
          big.attention_bias) == (3200, 45, "rms_norm", True, False)


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_sizes_reproduce_the_paper_recipe(name):
  cfg = load(name)
  assert cfg.train.trainable == "lora"
  assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.modules) == (16, 32.0, ("language",))
  assert set(cfg.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                   "down_proj"}
  assert (cfg.train.learning_rate, cfg.train.schedule, cfg.train.compute_dtype) == (
      1e-5, "cosine", "bfloat16")
  assert cfg.data.cutoff_len == 2048  # the per-size batch is pinned in test_recipe.py
  assert cfg.train.batch_size % cfg.train.grad_accum == 0
  steps = cfg.train.num_steps  # one epoch of FairFaceGPT, not more
  assert (steps - 1) * cfg.train.batch_size < FAIRFACEGPT_EXAMPLES <= steps * cfg.train.batch_size


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", TRAINABLE)
def test_argument_selects_what_trains(name, kind):
  cfg = load(name, kind)
  assert cfg.train.trainable == kind
  assert cfg.model == load(name).model  # the variant never changes the architecture


def test_default_variants():
  assert load("internvl3_8b").train.trainable == "lora"
  assert load("tiny").train.trainable == "full"
  # LoRA shards the frozen base over fsdp too: replicated, the 15.9 GB bf16 8B base would take that
  # much of every chip (benchmarks/README.md: 8B LoRA on v5p-8 fits its reference batch with fsdp=4).
  assert load("internvl3_8b").mesh.shape.to_dict() == {"data": 1, "fsdp": -1, "tensor": 1}
  assert load("internvl3_8b", "full").mesh.shape.to_dict() == {"data": 1, "fsdp": -1, "tensor": 1}


# The slice each paper size's defaults were measured on (benchmarks/README.md), in chips:
# v5p-8 (4 chips) for 1B and 8B, v5p-16 (8 chips) for 38B.
STATED_CHIPS = {"internvl3_1b": 4, "internvl3_8b": 4, "internvl3_38b": 8}


@pytest.mark.parametrize("recipe", ["reference", "ours"])
@pytest.mark.parametrize("name", PAPER_SIZES)
def test_default_batch_splits_over_the_stated_slice(name, recipe):
  cfg = load(name, f"recipe={recipe}")
  mesh = sharding.make_mesh(cfg.mesh.shape.to_dict(), jax.devices()[:STATED_CHIPS[name]])
  assert validate.batch_split_problem(cfg.train.batch_size, cfg.train.grad_accum,
                                      mesh.shape["data"] * mesh.shape["fsdp"]) is None
  assert cfg.train.scan_layers and cfg.train.remat in ("none", "full", "dots")


def test_a_batch_that_cannot_split_says_what_to_set():
  assert validate.batch_split_problem(80, 1, 8) is None
  assert validate.batch_split_problem(80, 4, 8).endswith("set train.grad_accum to one of [1, 2, 5, 10]")
  message = validate.batch_split_problem(12, 12, 16)
  assert "multiple of 16" in message and "mesh.shape.tensor" in message and "\n" not in message


@pytest.mark.parametrize("name, arg, words", [
    ("internvl3_1b", "qlora", ["'qlora'", "lora", "full", "all_but_vision"]),
    ("internvl3_1b", "vocab=2048", ["unknown key 'vocab'"]),
    ("tiny", "vocab=lots", ["vocab must be of type int", "'lots'"]),
    ("tiny", "steps=3", ["unknown key 'steps'", "vocab"]),
])
def test_bad_argument_says_what_is_expected(name, arg, words):
  with pytest.raises(ValueError) as error:
    load(name, arg)
  for word in words:
    assert word in str(error.value)


def test_tiny_argument_sets_the_vocabulary():
  cfg = load("tiny", "lora,vocab=2048")
  assert (cfg.train.trainable, cfg.model.text.vocab_size) == ("lora", 2048)


def test_command_line_overrides():
  cfg = parse_flags(["train", f"--config={CONFIGS / 'internvl3_1b.py'}:full",
                     "--config.mesh.shape.fsdp=2", "--config.train.learning_rate=3e-5",
                     "--config.data.dir=/data/fairfacegpt", "--config.model.text.num_hidden_layers=2"])
  assert cfg.mesh.shape.to_dict() == {"data": -1, "fsdp": 2, "tensor": 1}
  assert (cfg.train.trainable, cfg.train.learning_rate, cfg.data.dir) == ("full", 3e-5, "/data/fairfacegpt")
  assert config_lib.from_config_dict(cfg.model).text.num_hidden_layers == 2
  with pytest.raises(AttributeError, match="nope"):
    parse_flags(["train", f"--config={CONFIGS / 'tiny.py'}", "--config.train.nope=1"])


def test_in_code_overrides_and_typos():
  cfg = load("internvl3_38b")
  cfg.mesh.shape.fsdp = 2
  cfg.train.num_steps = 10
  assert (cfg.mesh.shape.fsdp, cfg.train.num_steps) == (2, 10)
  with pytest.raises(AttributeError):
    cfg.train.learnig_rate = 1e-4  # locked: a misspelt key fails instead of being ignored


def test_tiny_image_token_is_the_trained_tokenizers(tmp_path):
  cfg = load("tiny")
  texts = ["A young woman with short dark hair smiles at the camera."] * 20
  tokenizer = tok_lib.train_tokenizer(texts, cfg.model.text.vocab_size, tmp_path)
  assert tokenizer.image_token_id == cfg.model.image_token_id
  assert tokenizer.vocab_size <= cfg.model.text.vocab_size


def test_tiny_model_runs_forward():
  config = config_lib.from_config_dict(load("tiny").model)
  assert config.image_seq_length == 16
  model = FaceLLM(config, rngs=nnx.Rngs(0))
  n = config.image_seq_length
  ids = np.full((2, n + 8), 17, np.int32)
  ids[0, 2:2 + n] = config.image_token_id
  ids[1, 5:5 + n] = config.image_token_id
  size = config.vision.image_size
  pixels = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  forward = nnx.jit(lambda m, i, x: m(i, x))
  logits = forward(model, jnp.asarray(ids), pixels)
  assert logits.shape == (2, n + 8, config.text.vocab_size)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  # Each row sees its own image: swapping the images changes the logits after them.
  swapped = forward(model, jnp.asarray(ids), pixels[::-1])
  assert not np.allclose(np.asarray(logits[:, -1]), np.asarray(swapped[:, -1]))
