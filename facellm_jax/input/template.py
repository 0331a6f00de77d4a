"""InternVL's chat template (Qwen ChatML) rendered straight to token ids and a loss mask.

The ids are what LLaMA-Factory's `intern_vl` template encodes for training (the reference run of
FaceLLM) and what `InternVL3-*-hf`'s `apply_chat_template` plus its processor produce:

  [<|im_start|>system\n{system}<|im_end|>\n]
  <|im_start|>user\n<img>{N x <IMG_CONTEXT>}</img>\n{question}<|im_end|>\n<|im_start|>assistant\n
  {answer}<|im_end|>\n

Each `<image>` marker in a message becomes one image block of `num_image_tokens` placeholders per
tile, in place (LLaMA-Factory's InternVL plugin; the `\n` after it is the message's own text).
As LLaMA-Factory's `Template._encode` does, each assistant message is tokenized on its own, apart
from the text before it (BPE never merges across the start of an answer), and its tokens, the
closing `<|im_end|>\n` included, are the loss tokens (its supervised `labels`). An empty or absent
system message renders nothing, as its `if system` does. The text is tokenized with a single
placeholder per image (a special token, so it splits exactly as the expanded text would) and the
ids are expanded after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from facellm_jax.input import tokenizer as tok_lib

IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")


def _check(messages: Sequence[Mapping[str, str]], system_prompt: str | None) -> list[tuple[str, str]]:
  out = []
  if system_prompt and not (messages and messages[0].get("role") == "system"):
    out.append(("system", system_prompt))
  for i, m in enumerate(messages):
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
    if not isinstance(content, str):
      raise ValueError(f"message {i}: content must be a string (images as {IMAGE_MARKER!r} markers), "
                       f"got {type(content).__name__}")
    if role == "system" and not content:
      continue
    out.append((role, content))
  return out


def _pieces(messages: list[tuple[str, str]], generation: bool) -> list[tuple[str, bool]]:
  """The text as (piece, is_answer) in the order tokenized: each answer a piece of its own."""
  image_block = tok_lib.IMG_START + tok_lib.IMG_CONTEXT + tok_lib.IMG_END
  pieces, text = [], ""
  for role, content in messages:
    text += f"{tok_lib.IM_START}{role}\n"
    if role == "assistant":
      pieces += [(text, False), (f"{content}{tok_lib.IM_END}\n", True)]
      text = ""
    else:
      text += f"{content.replace(IMAGE_MARKER, image_block)}{tok_lib.IM_END}\n"
  if generation:
    text += f"{tok_lib.IM_START}assistant\n"
  return pieces + [(text, False)]


def _render(messages: list[tuple[str, str]], tokenizer: tok_lib.Tokenizer, num_image_tokens: int,
            num_tiles: Sequence[int] | None, generation: bool) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = [], []
  for piece, is_answer in _pieces(messages, generation):
    if piece:
      encoded = tokenizer.encode(piece)
      ids += encoded
      mask += [float(is_answer)] * len(encoded)
  ids = np.asarray(ids, np.int32)
  mask = np.asarray(mask, np.float32)

  is_image = ids == tokenizer.image_token_id
  num_images = int(is_image.sum())
  tiles = [1] * num_images if num_tiles is None else list(num_tiles)
  if len(tiles) != num_images:
    raise ValueError(f"the messages have {num_images} {IMAGE_MARKER!r} markers but num_tiles has "
                     f"{len(tiles)} entries")
  repeats = np.ones(len(ids), np.int64)
  repeats[is_image] = np.asarray(tiles, np.int64) * num_image_tokens
  return np.repeat(ids, repeats), np.repeat(mask, repeats)


def render_conversation(messages: Sequence[Mapping[str, str]], tokenizer: tok_lib.Tokenizer,
                        num_image_tokens: int, *, num_tiles: Sequence[int] | None = None,
                        system_prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token ids int32 [L] of a whole conversation and a float32 [L] mask, 1 on assistant tokens
  (each answer, its `<|im_end|>` and the newline after it).

  Args:
    messages: `{"role": "system"|"user"|"assistant", "content": str}` in order; `<image>` in a
      system/user message marks where an image goes.
    tokenizer: the checkpoint's (or a trained) tokenizer.
    num_image_tokens: `<IMG_CONTEXT>` placeholders per tile (the config's `image_seq_length`).
    num_tiles: tiles of each image in order (dynamic tiling, thumbnail included); default 1 each.
    system_prompt: prepended as a system message unless the messages start with one; '' or None:
      none.
  """
  return _render(_check(messages, system_prompt), tokenizer, num_image_tokens, num_tiles, False)


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: tok_lib.Tokenizer,
                  num_image_tokens: int, *, num_tiles: Sequence[int] | None = None,
                  system_prompt: str | None = None) -> np.ndarray:
  """Token ids int32 [L] for generation: the conversation so far, then `<|im_start|>assistant\\n`."""
  ids, _ = _render(_check(messages, system_prompt), tokenizer, num_image_tokens, num_tiles, True)
  return ids


def image_spans(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
  """[start, end) of each run of consecutive image placeholders in `ids`."""
  is_image = np.concatenate([[False], np.asarray(ids) == image_token_id, [False]])
  edges = np.flatnonzero(np.diff(is_image.astype(np.int8)))
  return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
