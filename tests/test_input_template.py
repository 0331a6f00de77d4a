"""Chat template: InternVL-hf's rendering, and a loss mask on exactly the assistant tokens."""

import numpy as np
import pytest
import transformers

from facellm_jax.input import template
from facellm_jax.input import tokenizer as tok_lib

N = 3  # image placeholders per tile

CONVERSATION = [
    {"role": "user", "content": "<image>\nHow old is the person?"},
    {"role": "assistant", "content": "The person looks 20-29 years old."},
    {"role": "user", "content": "And the expression? Compare with <image>\nplease."},
    {"role": "assistant", "content": " A calm, neutral look — naïve smile.\n\nDone"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  texts = [m["content"] for m in CONVERSATION] * 10
  tok_lib.train_tokenizer(texts, 320, out)
  return out


@pytest.fixture(scope="module")
def tok(tok_dir):
  return tok_lib.load_tokenizer(tok_dir)


def _hf_reference(tok_dir, messages, tiles, **kwargs):
  """transformers' apply_chat_template on the saved template, then the processor's expansion."""
  hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
  structured = []
  for m in messages:
    if m["role"] == "assistant" or "<image>" not in m["content"]:
      structured.append(m)
      continue
    content = []
    for i, piece in enumerate(m["content"].split("<image>\n")):
      if i:
        content.append({"type": "image"})
      if piece:
        content.append({"type": "text", "text": piece})
    structured.append({"role": m["role"], "content": content})
  text = hf.apply_chat_template(structured, tokenize=False, **kwargs)
  pieces = text.split("<IMG_CONTEXT>")
  assert len(pieces) == len(tiles) + 1
  expanded = pieces[0]
  for t, rest in zip(tiles, pieces[1:]):
    expanded += "<img>" + "<IMG_CONTEXT>" * (N * t) + "</img>" + rest
  return hf(expanded, add_special_tokens=False)["input_ids"]


def test_matches_the_hf_chat_template_after_placeholder_expansion(tok, tok_dir):
  messages = [{"role": "system", "content": "You are a face analyst."}] + CONVERSATION
  ids, _ = template.render_conversation(messages, tok, N, num_tiles=[1, 2])
  assert ids.tolist() == _hf_reference(tok_dir, messages, [1, 2])
  text = tok.decode(ids)
  assert text.startswith("<|im_start|>system\nYou are a face analyst.<|im_end|>\n<|im_start|>user\n"
                         "<img>" + "<IMG_CONTEXT>" * N + "</img>\nHow old")
  assert text.endswith("<|im_start|>assistant\n A calm, neutral look — naïve smile.\n\nDone"
                       "<|im_end|>\n")


def test_render_prompt_matches_hf_generation_prompt(tok, tok_dir):
  ids = template.render_prompt(CONVERSATION[:3], tok, N, num_tiles=[1, 1])
  assert ids.tolist() == _hf_reference(tok_dir, CONVERSATION[:3], [1, 1],
                                       add_generation_prompt=True)
  assert tok.decode(ids).endswith("please.<|im_end|>\n<|im_start|>assistant\n")


def test_loss_tokens_decode_to_exactly_the_answers_and_their_im_end_newline(tok):
  ids, mask = template.render_conversation(CONVERSATION, tok, N, system_prompt="Be brief.")
  assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  runs = [tok.decode(ids[a:b]) for a, b in zip(edges[0::2], edges[1::2])]
  assert runs == [m["content"] + "<|im_end|>\n" for m in CONVERSATION if m["role"] == "assistant"]
  assert tok.decode(ids[mask == 0]).count("<|im_start|>assistant\n") == 2
  assert not np.any(mask[ids == tok.image_token_id])


def test_empty_system_prompt_renders_nothing(tok):
  none, _ = template.render_conversation(CONVERSATION[:2], tok, N)
  for empty in ("", None):
    ids, _ = template.render_conversation(CONVERSATION[:2], tok, N, system_prompt=empty)
    assert ids.tolist() == none.tolist()
  explicit, _ = template.render_conversation([{"role": "system", "content": ""}] + CONVERSATION[:2], tok, N)
  assert explicit.tolist() == none.tolist()
  assert tok.decode(none).startswith("<|im_start|>user\n")


def test_system_prompt_is_prepended_once(tok):
  with_system, _ = template.render_conversation(CONVERSATION[:2], tok, N, system_prompt="S.")
  explicit = [{"role": "system", "content": "Mine."}] + CONVERSATION[:2]
  kept, _ = template.render_conversation(explicit, tok, N, system_prompt="S.")
  assert tok.decode(with_system).startswith("<|im_start|>system\nS.<|im_end|>\n<|im_start|>user")
  assert tok.decode(kept).count("<|im_start|>system") == 1
  assert tok.decode(kept).startswith("<|im_start|>system\nMine.<|im_end|>")


def test_each_image_is_one_run_of_tiles_times_placeholders(tok):
  ids, _ = template.render_conversation(CONVERSATION, tok, N, num_tiles=[3, 1])
  spans = template.image_spans(ids, tok.image_token_id)
  assert [b - a for a, b in spans] == [3 * N, N]
  for a, b in spans:
    assert ids[a - 1] == tok.img_start_id and ids[b] == tok.img_end_id


def test_bad_messages_are_rejected_with_the_reason(tok):
  with pytest.raises(ValueError, match="2 '<image>' markers but num_tiles has 1"):
    template.render_conversation(CONVERSATION, tok, N, num_tiles=[1])
  with pytest.raises(ValueError, match="message 0: role must be one of"):
    template.render_conversation([{"role": "bot", "content": "x"}], tok, N)
  with pytest.raises(ValueError, match="message 0: content must be a string"):
    template.render_conversation([{"role": "user", "content": [{"type": "image"}]}], tok, N)
