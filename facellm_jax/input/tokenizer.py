"""Tokenizers: a small byte-level BPE for tiny configs, or the one shipped with an InternVL checkpoint.

Both are a `tokenizer.json` read by the `tokenizers` library, so training and inference never import
`transformers`. A trained tokenizer directory is also a valid `transformers` tokenizer (the same
Qwen2 pre-tokenization, special tokens and chat template as `InternVL3-*-hf`), which is what export
to a HF checkpoint relies on.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
# Order matters only for a trained tokenizer's ids: the chat and image tokens come first, then the
# grounding and video tokens InternVL also reserves, so a checkpoint's prompts stay tokenizable.
SPECIAL_TOKENS = (PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT,
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>")

# Qwen2's pre-tokenization split (letters, single digits, punctuation runs, newlines, spaces); a
# trained tokenizer must split text exactly like `transformers.Qwen2Tokenizer` rebuilds it.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The ChatML template of `InternVL3-*-hf`: each message is `<|im_start|>role\n...<|im_end|>\n`; an
# image item renders as `<IMG_CONTEXT>\n`, which the HF processor expands to
# `<img>` + image_seq_length * tiles * `<IMG_CONTEXT>` + `</img>`.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' ~ m['role'] ~ '\\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the ids the chat template and the model need."""

  def __init__(self, backend: tokenizers.Tokenizer, *, eos: str = IM_END, pad: str = PAD,
               source: str = "<memory>"):
    self.backend = backend
    ids = {}
    for token in (PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, eos, pad):
      ids[token] = backend.token_to_id(token)
      if ids[token] is None:
        raise ValueError(f"tokenizer {source} has no {token!r} token; an InternVL (Qwen2 ChatML) "
                         f"tokenizer needs {', '.join(SPECIAL_TOKENS[:6])}")
    self.im_start_id = ids[IM_START]
    self.im_end_id = ids[IM_END]
    self.img_start_id = ids[IMG_START]
    self.img_end_id = ids[IMG_END]
    self.image_token_id = ids[IMG_CONTEXT]
    self.eos_id = ids[eos]
    self.pad_id = ids[pad]

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special tokens written in the text become their ids, nothing is added."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def __getstate__(self):  # Grain workers receive the tokenizer pickled.
    return {"json": self.backend.to_str(), "eos": self.backend.id_to_token(self.eos_id),
            "pad": self.backend.id_to_token(self.pad_id)}

  def __setstate__(self, state):
    self.__init__(tokenizers.Tokenizer.from_str(state["json"]), eos=state["eos"], pad=state["pad"])


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                    *, model_max_length: int = 8192) -> Tokenizer:
  """Trains a byte-level BPE on `texts` and saves it as a HF tokenizer directory.

  Byte-level with all 256 bytes in the base alphabet, so any text (and any checkpoint prompt) is
  encodable whatever the training corpus was.
  """
  min_size = 256 + len(SPECIAL_TOKENS)
  if vocab_size < min_size:
    raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} "
                     f"special tokens), got {vocab_size}")
  backend = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(texts, trainer=trainer)
  _save_hf_dir(backend, pathlib.Path(out_dir), model_max_length)
  return Tokenizer(backend, source=str(out_dir))


def _save_hf_dir(backend: tokenizers.Tokenizer, out: pathlib.Path, model_max_length: int) -> None:
  out.mkdir(parents=True, exist_ok=True)
  backend.save(str(out / "tokenizer.json"))
  added = {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False,
                                         "normalized": False, "single_word": False, "special": True}
           for t in SPECIAL_TOKENS}
  extra = {"start_image_token": IMG_START, "end_image_token": IMG_END,
           "context_image_token": IMG_CONTEXT, "video_token": "<video>"}
  config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "added_tokens_decoder": added,
      "bos_token": None,
      "eos_token": IM_END,
      "pad_token": PAD,
      "unk_token": None,
      "model_max_length": model_max_length,
      "clean_up_tokenization_spaces": False,
      "split_special_tokens": False,
      "errors": "replace",
      "extra_special_tokens": extra,
      "chat_template": CHAT_TEMPLATE,
  }
  special_map = {"eos_token": IM_END, "pad_token": PAD,
                 "additional_special_tokens": list(SPECIAL_TOKENS[3:])}
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
  (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
  (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads `tokenizer.json` from a file, a tokenizer directory or a HF InternVL checkpoint directory.

  The end-of-turn and padding tokens come from `tokenizer_config.json` when there is one (an
  InternVL3-hf checkpoint says `<|im_end|>` / `<|endoftext|>`, as the trained ones do).
  """
  path = pathlib.Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(f"no tokenizer at {path}: expected a tokenizer.json file or a directory "
                            "containing one (a trained tokenizer or a HF InternVL checkpoint)")
  try:
    backend = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e:  # the Rust side raises a bare Exception on malformed JSON.
    raise ValueError(f"{file} is not a valid tokenizers JSON file: {e}") from e
  eos, pad = IM_END, PAD
  config_file = file.parent / "tokenizer_config.json"
  if config_file.is_file():
    config = json.loads(config_file.read_text())
    eos = _token_str(config.get("eos_token")) or eos
    pad = _token_str(config.get("pad_token")) or pad
  return Tokenizer(backend, eos=eos, pad=pad, source=str(file))


def _token_str(token) -> str | None:
  """`tokenizer_config.json` stores a token as a string or as an AddedToken dict."""
  return token.get("content") if isinstance(token, dict) else token
