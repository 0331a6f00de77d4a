"""The size configs are the reference run of idiap/facellm (train.sh / export.sh) unless told otherwise."""

import importlib.util
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SIZES = sorted(p.stem for p in CONFIGS.glob("internvl*.py"))
FAIRFACEGPT_EXAMPLES = 87_632
# LLaMA-Factory's intern_vl template, default_system (written out here, not imported from configs).
INTERN_VL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                    "多模态大语言模型。")
# size -> (per_device_train_batch_size, gradient_accumulation_steps, optimizer steps of the epoch):
# train.sh runs the 38B at 2 x 6; its note runs the 1B and 8B at 10 x 8; export.sh exports checkpoint-7303.
REFERENCE = {"internvl3_1b": (10, 8, 1096), "internvl3_8b": (10, 8, 1096), "internvl3_38b": (2, 6, 7303)}
LANGUAGE_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def hf_trainer_updates(examples: int, per_device: int, accumulation: int) -> int:
  """Optimizer steps of one epoch as the HF Trainer counts them on one process (last batch and last
  accumulation window partial)."""
  batches = -(-examples // per_device)
  return -(-batches // accumulation)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_batch_and_steps_are_the_reference_runs(name):
  per_device, accumulation, steps = REFERENCE[name]
  cfg = load(name)
  assert cfg.train.batch_size == per_device * accumulation
  assert cfg.train.num_steps == steps == hf_trainer_updates(FAIRFACEGPT_EXAMPLES, per_device, accumulation)


@pytest.mark.parametrize("name", SIZES)
def test_every_size_trains_one_epoch_with_the_reference_flags(name):
  cfg = load(name)
  t = cfg.train
  assert (t.num_steps - 1) * t.batch_size < FAIRFACEGPT_EXAMPLES <= t.num_steps * t.batch_size
  assert t.batch_size % t.grad_accum == 0
  assert t.warmup_ratio == 0.0  # --warmup_steps 0
  assert (t.learning_rate, t.schedule, t.max_grad_norm, t.weight_decay) == (1e-5, "cosine", 1.0, 0.0)
  assert (t.trainable, t.compute_dtype) == ("lora", "bfloat16")
  assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.modules) == (16, 32.0, ("language",))
  assert set(cfg.lora.targets) == LANGUAGE_LINEARS  # --lora_target all, vision and projector frozen
  assert (cfg.data.cutoff_len, cfg.data.packing) == (2048, False)
  assert cfg.data.system_prompt == INTERN_VL_SYSTEM


@pytest.mark.parametrize("name", SIZES)
def test_recipe_ours_restores_the_earlier_values(name):
  cfg = load(name, "recipe=ours")
  assert (cfg.train.batch_size, cfg.train.num_steps, cfg.train.warmup_ratio) == (96, 913, 0.1)
  assert cfg.data.system_prompt == ""
  reference = load(name)
  assert cfg.model == reference.model and cfg.lora == reference.lora
  assert (cfg.train.learning_rate, cfg.train.grad_accum) == (reference.train.learning_rate, reference.train.grad_accum)


def test_recipe_combines_with_the_trainable_kind():
  cfg = load("internvl3_8b", "full,recipe=ours")
  assert (cfg.train.trainable, cfg.train.batch_size) == ("full", 96)
  with pytest.raises(ValueError, match="recipe='paper': expected one of reference, ours"):
    load("internvl3_1b", "recipe=paper")


def test_steps_follow_an_overridden_batch_unless_set_themselves():
  argv = ["train", f"--config={CONFIGS / 'internvl3_38b.py'}", "--config.train.batch_size=24"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  assert (values.config.train.batch_size, values.config.train.num_steps) == (24, 3652)
  cfg = load("internvl3_1b")
  cfg.train.num_steps = 10
  cfg.train.batch_size = 40
  assert cfg.train.num_steps == 10


def test_tiny_configs_keep_their_own_recipe_and_no_system_message():
  for name in ("tiny", "demo", "demo_pretrain"):
    assert load(name).data.system_prompt == ""
