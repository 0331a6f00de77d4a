"""Training examples are token for token what LLaMA-Factory's `intern_vl` template encodes.

The reference below is written from LLaMA-Factory's facts (data/template.py `intern_vl`:
format_system / format_user / format_assistant strings, `default_system`, the bos prefix, and
`Template._encode` encoding each element on its own; data/mm_plugin.py `InternVLPlugin`: `<image>`
-> `<img>` + image_seq_length x patches `<IMG_CONTEXT>` + `</img>`; processor/supervised.py: labels
are the assistant element, the prompt IGNORE), on a tokenizer with Qwen2.5's special tokens built
here, and read through transformers. It shares no code with facellm_jax's template.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from facellm_jax.input import pipeline
from facellm_jax.input import tokenizer as tok_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
IGNORE = -100
IMAGE_SEQ_LENGTH = 256  # InternVL3-hf's image_seq_length: (448 / 14 * 0.5) ** 2
DEFAULT_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                  "多模态大语言模型。")
# Qwen2.5's added tokens in id order (special ones, then the tool / fill-in-the-middle ones), then
# the tokens InternVL3 appends (ids 151665.. in the released tokenizer).
QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN25_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
INTERNVL_SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ShareGPT FairFaceGPT records as data/dataset_info.json maps them (from/value, human/assistant).
RECORDS = [
    {"conversations": [
        {"from": "human", "value": "<image>\nDescribe the face pose of the image based on the visual information."},
        {"from": "assistant", "value": "The face is frontal, slightly tilted to the left; the gaze meets the camera."}],
     "image": "val/1.jpg"},
    {"conversations": [  # an answer that starts with newlines: joint tokenization would merge them
        {"from": "human", "value": "<image>\nDescribe this image."},
        {"from": "assistant", "value": "\n\nA young woman, around 20-29 years old, smiling.\n\n\nNeutral light."}],
     "image": "val/2.jpg"},
]


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
  """A byte-level BPE with Qwen2's split and Qwen2.5 + InternVL added tokens, as a HF directory."""
  out = tmp_path_factory.mktemp("qwen_like")
  corpus = [t["value"] for r in RECORDS for t in r["conversations"]] * 20 + [DEFAULT_SYSTEM] * 5
  corpus += ["\n\n\n", "\n\n", "old.\n\n\nNext", "user\n\n\nA"] * 20
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  backend.add_special_tokens(QWEN25_SPECIAL)
  backend.add_tokens([tokenizers.AddedToken(t, special=False) for t in QWEN25_ADDED])
  backend.add_special_tokens(INTERNVL_SPECIAL)
  backend.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
       "pad_token": "<|endoftext|>"}))
  return out


def llamafactory_encode(hf_tok, record: dict, num_patches: int, system: str | None = None):
  """input_ids and labels of one ShareGPT record as LLaMA-Factory's supervised processor builds them."""
  turns = record["conversations"]
  messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
  for m in messages:  # InternVLPlugin.process_messages
    m["content"] = m["content"].replace(
        "<image>", "<img>" + "<IMG_CONTEXT>" * IMAGE_SEQ_LENGTH * num_patches + "</img>", 1)
  system = system or DEFAULT_SYSTEM
  input_ids, labels = [], []
  for i, m in enumerate(messages):
    elements = []
    if i == 0:
      if hf_tok.bos_token_id is not None:
        elements.append(hf_tok.bos_token_id)
      if system:
        elements.append("<|im_start|>system\n" + system + "<|im_end|>\n")
    if m["role"] == "user":
      elements.append("<|im_start|>user\n" + m["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    else:
      elements.append(m["content"] + "<|im_end|>\n")
    ids = []
    for e in elements:
      ids += [e] if isinstance(e, int) else hf_tok.encode(e, add_special_tokens=False)
    input_ids += ids
    labels += [IGNORE] * len(ids) if m["role"] == "user" else ids
  return input_ids, labels


def _reference_config_system_prompt() -> str:
  spec = importlib.util.spec_from_file_location("cfg_1b", CONFIGS / "internvl3_1b.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().data.system_prompt


def _ours(tok, record, system_prompt):
  question = record["conversations"][0]["value"].replace("<image>\n", "")
  face = np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)  # a FairFace crop's size
  return pipeline.record_to_example(
      {"image": face, "question": question, "answer": record["conversations"][1]["value"]}, tok,
      image_size=28, num_image_tokens=IMAGE_SEQ_LENGTH, seq_len=2048, system_prompt=system_prompt)


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_training_example_is_llamafactorys_encoding_of_the_record(qwen_like, index):
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen_like / "tokenizer.json"),
                                                bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  tok = tok_lib.load_tokenizer(qwen_like)
  assert tok.image_token_id == hf_tok.convert_tokens_to_ids("<IMG_CONTEXT>")
  ids, labels = llamafactory_encode(hf_tok, RECORDS[index], num_patches=1)
  example = _ours(tok, RECORDS[index], _reference_config_system_prompt())
  # Ours is shifted for next-token prediction: inputs ids[:-1], targets ids[1:].
  assert example["input_ids"].tolist() == ids[:-1]
  assert example["targets"].tolist() == ids[1:]
  assert example["loss_mask"].tolist() == [float(x != IGNORE) for x in labels[1:]]
  assert example["pixel_values"].shape == (1, 28, 28, 3)  # no tiling in training (crop_to_patches off)
  text = hf_tok.decode(ids)
  assert text.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT>")
  assert text.endswith("<|im_end|>\n")


def test_an_answer_is_tokenized_apart_from_its_prompt(qwen_like):
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen_like / "tokenizer.json"))
  ids, _ = llamafactory_encode(hf_tok, RECORDS[1], num_patches=1)
  joint = hf_tok.encode(hf_tok.decode(ids), add_special_tokens=False)
  assert joint != ids  # so the test above would catch one tokenization of the whole text
  example = _ours(tok_lib.load_tokenizer(qwen_like), RECORDS[1], DEFAULT_SYSTEM)
  assert example["input_ids"].tolist() + [ids[-1]] == ids


def test_an_empty_system_prompt_removes_the_system_turn(qwen_like):
  tok = tok_lib.load_tokenizer(qwen_like)
  example = _ours(tok, RECORDS[0], "")
  assert tok.decode(example["input_ids"]).startswith("<|im_start|>user\n<img>")
  other = _ours(tok, RECORDS[0], "You are a face analyst.")
  assert tok.decode(other["input_ids"]).startswith("<|im_start|>system\nYou are a face analyst.<|im_end|>\n")
