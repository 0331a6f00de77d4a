"""Tokenizer: a trained BPE is a valid HF tokenizer dir; checkpoint tokenizers load with their ids."""

import json
import pickle

import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers

from facellm_jax.input import tokenizer as tok_lib

TEXTS = ["The person in the image appears to be a young adult woman, around 20-29 years old.",
         "What is the apparent age of the person? Describe the gender.",
         "Il a l'air d'avoir 30 ans; née à Zürich."] * 20
SAMPLE = ("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHow old is she? 1234 ans!"
          "<|im_end|>\n<|im_start|>assistant\n  About\n\n30 years — née<|im_end|>\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  return tok_lib.train_tokenizer(TEXTS, 400, out), out


def test_trained_tokenizer_loads_in_transformers_with_the_same_ids(trained):
  tok, out = trained
  hf = transformers.AutoTokenizer.from_pretrained(out)
  assert hf(SAMPLE, add_special_tokens=False)["input_ids"] == tok.encode(SAMPLE)
  assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
  assert (hf.start_image_token, hf.end_image_token, hf.context_image_token) == (
      "<img>", "</img>", "<IMG_CONTEXT>")
  assert hf.context_image_token_id == tok.image_token_id
  assert hf.convert_tokens_to_ids("<|im_end|>") == tok.eos_id == tok.im_end_id
  assert (out / "special_tokens_map.json").is_file() and (out / "chat_template.jinja").is_file()


def test_special_tokens_are_single_ids_and_roundtrip(trained):
  tok, _ = trained
  ids = tok.encode("<img><IMG_CONTEXT></img><|im_start|><|im_end|><|endoftext|>")
  assert ids == [tok.img_start_id, tok.image_token_id, tok.img_end_id, tok.im_start_id,
                 tok.im_end_id, tok.pad_id]
  assert len(set(ids)) == 6
  assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
  assert tok.vocab_size == tokenizers.Tokenizer.from_file(
      str(trained[1] / "tokenizer.json")).get_vocab_size()


def test_load_tokenizer_from_a_dir_or_its_file(trained):
  tok, out = trained
  for path in (out, out / "tokenizer.json"):
    loaded = tok_lib.load_tokenizer(path)
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.image_token_id == tok.image_token_id and loaded.eos_id == tok.eos_id


def test_load_tokenizer_reads_a_checkpoint_layout(tmp_path):
  # An InternVL3-hf checkpoint: specials after the BPE vocab, eos/pad named in tokenizer_config.json
  # (here as AddedToken dicts), config.json and weights beside.
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.add_tokens([chr(c) for c in range(ord("a"), ord("z") + 1)])
  backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                              "<IMG_CONTEXT>"])
  backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl"}))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>"}))
  tok = tok_lib.load_tokenizer(tmp_path)
  assert (tok.pad_id, tok.im_start_id, tok.eos_id, tok.img_start_id, tok.img_end_id,
          tok.image_token_id) == (26, 27, 28, 29, 30, 31)
  assert tok.vocab_size == 32


def test_load_tokenizer_errors_say_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer at .*nowhere"):
    tok_lib.load_tokenizer(tmp_path / "nowhere")
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
    tok_lib.load_tokenizer(tmp_path)
  plain = tokenizers.Tokenizer(models.BPE())
  plain.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  plain.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no '<img>' token"):
    tok_lib.load_tokenizer(tmp_path)


def test_train_tokenizer_rejects_a_vocab_smaller_than_bytes_plus_specials(tmp_path):
  with pytest.raises(ValueError, match="at least 269"):
    tok_lib.train_tokenizer(TEXTS, 100, tmp_path)


def test_tokenizer_survives_pickling_for_grain_workers(trained):
  tok, _ = trained
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(SAMPLE) == tok.encode(SAMPLE)
  assert (clone.eos_id, clone.pad_id, clone.image_token_id) == (tok.eos_id, tok.pad_id,
                                                                tok.image_token_id)
