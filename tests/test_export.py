"""`python -m facellm_jax.export`: the merged LoRA run as a transformers checkpoint and as Orbax."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors import safe_open

from facellm_jax import export
from facellm_jax.inference import answer, load
from facellm_jax.inference.generate import Generator
from tiny_runs import face_png, trained_run

QUESTION = "What is the age of this person?"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def workdir(lora_workdir):
  return lora_workdir


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  assert export.main(["--workdir", str(workdir), "--out", str(root / "hf"), "--orbax", str(root / "orbax")]) == 0
  return root


@pytest.fixture(scope="module")
def unmerged(workdir):
  """The run as training holds it: base weights plus live LoRA adapters."""
  model, _, lora = load.restore_workdir(workdir)
  assert lora is not None
  return model


@pytest.fixture(scope="module")
def merged(workdir):
  return load.load_for_inference(workdir)


@pytest.fixture(scope="module")
def prompt(merged, tmp_path_factory):
  _, config, tokenizer = merged
  image = face_png(tmp_path_factory.mktemp("img") / "face.png", 7)
  ids, pixels = answer.prepare(config, tokenizer, QUESTION, [image])
  return image, ids, pixels, config, tokenizer


@pytest.fixture(scope="module")
def logits(merged, unmerged, prompt):
  """Our logits for the prompt: the run with live adapters, and merged."""
  _, ids, pixels, _, _ = prompt
  return {"unmerged": np.asarray(unmerged(ids[None], pixels)), "merged": np.asarray(merged[0](ids[None], pixels))}


def test_lora_adapters_are_trained_and_merged_into_the_export(exported, unmerged, prompt, logits):
  from transformers import InternVLForConditionalGeneration

  _, ids, pixels, _, _ = prompt
  ours = logits["unmerged"]
  without = nnx.clone(unmerged)
  nnx.update(without, jax.tree.map(np.zeros_like, nnx.state(without, nnx.LoRAParam)))
  assert np.abs(np.asarray(without(ids[None], pixels)) - ours).max() > 1e-3  # the adapters matter
  hf_model = InternVLForConditionalGeneration.from_pretrained(exported / "hf").eval()
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids[None], dtype=torch.long),
                      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_generates_the_same_greedy_tokens_as_our_generator(exported, unmerged, prompt):
  from transformers import AutoImageProcessor, AutoTokenizer, InternVLForConditionalGeneration

  image, ids, pixels, config, tokenizer = prompt
  hf_dir = exported / "hf"
  hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
  text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * config.image_seq_length + "</img>", 1)
  hf_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
  assert hf_ids == ids.tolist()
  hf_pixels = AutoImageProcessor.from_pretrained(hf_dir)(images=[Image.open(image)], return_tensors="np")
  hf_pixels = hf_pixels["pixel_values"]
  np.testing.assert_allclose(hf_pixels.transpose(0, 2, 3, 1), pixels, atol=1e-5)

  hf_model = InternVLForConditionalGeneration.from_pretrained(hf_dir).eval()
  out = hf_model.generate(input_ids=torch.tensor([hf_ids]), pixel_values=torch.from_numpy(hf_pixels),
                          max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(hf_ids):].tolist()
  eos = set(json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"])
  hf_tokens = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
  ours = Generator(unmerged, max_new_tokens=NEW_TOKENS, eos_ids=answer.eos_ids(tokenizer),
                   pad_id=tokenizer.pad_id)([ids.tolist()], pixels)[0]
  assert len(ours) >= 4 and hf_tokens == ours


def test_orbax_export_restores_to_the_same_logits(exported, merged, prompt, logits):
  _, ids, pixels, _, tokenizer = prompt
  model, config, restored_tokenizer = export.restore_orbax(exported / "orbax")
  assert config == merged[1] and restored_tokenizer.vocab_size == tokenizer.vocab_size
  restored = np.asarray(model(ids[None], pixels))
  np.testing.assert_array_equal(restored, logits["merged"])
  np.testing.assert_allclose(restored, logits["unmerged"], atol=1e-4, rtol=0)


def test_hf_export_loads_back_in_jax(exported, prompt, logits):
  _, ids, pixels, _, tokenizer = prompt
  model, _, hf_tokenizer = load.load_for_inference(hf_dir=exported / "hf")
  np.testing.assert_array_equal(np.asarray(model(ids[None], pixels)), logits["merged"])
  assert hf_tokenizer.encode(QUESTION) == tokenizer.encode(QUESTION)


def test_bfloat16_export_writes_bfloat16_weights(workdir, tmp_path):
  assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
  assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
  with safe_open(str(tmp_path / "hf/model.safetensors"), framework="pt") as f:
    assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


def test_non_empty_out_and_missing_checkpoint_are_one_line_errors(workdir, exported, tmp_path, capsys):
  assert export.main(["--workdir", str(workdir), "--out", str(exported / "hf")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "not an empty folder" in err
  (tmp_path / "run").mkdir()
  (tmp_path / "run/config.json").write_text((workdir / "config.json").read_text())
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "no complete checkpoint" in err


@pytest.mark.parametrize("variant", ["lora", "full"])
def test_workdir_restores_to_the_weights_training_ended_with(tmp_path_factory, offline_dataset, variant):
  result = trained_run(tmp_path_factory, offline_dataset, variant, num_steps=1 if variant == "full" else 3)
  model, _, _ = load.restore_workdir(result.workdir)
  trained = jax.tree.leaves(nnx.to_pure_dict(result.state[0]))
  restored = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
  assert len(restored) == len(trained) > 0
  for a, b in zip(restored, trained):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
