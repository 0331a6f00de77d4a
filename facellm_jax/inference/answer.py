"""Questions about images in, answer text out: the one path evaluation, chat and the demo share.

A question is text with one `<image>` marker per image (none: the images go first, as
FaceXBench's prompts put them) and the images as files or uint8 arrays. It becomes InternVL's
chat prompt (`input.template.render_prompt`: each marker expands to `<img>`, the image's
placeholders, `</img>`) plus its pixels preprocessed at the model's image size, and goes
through a KV-cache `Generator` kept per model and settings, so repeated questions reuse both
the object and its compiled code. Tiling is off by default (FaceLLM trains on whole face
crops); `max_tiles > 1` turns on InternVL's dynamic tiling.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Iterator, Sequence

import numpy as np

from facellm_jax.evaluation import facexbench
from facellm_jax.inference.generate import Generator
from facellm_jax.input import image as image_lib
from facellm_jax.input import template
from facellm_jax.input.tokenizer import Tokenizer
from facellm_jax.models.config import FaceLLMConfig
from facellm_jax.models.facellm import FaceLLM

ImageLike = str | os.PathLike | np.ndarray
IMAGE_MARKER = template.IMAGE_MARKER


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to answer: generation length and sampling (greedy by default), tiling, system prompt.

  `decode_stage`: new tokens the KV cache first has room for (`Generator`'s `stage`; None = all
  `max_new_tokens` at once). The answers are the same either way.
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  max_tiles: int = 1
  system_prompt: str | None = None
  decode_stage: int | None = 32


# model -> {(settings that shape the Generator) -> Generator}; entries go with their model.
_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eos_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """Stop tokens: the end of turn and Qwen's <|endoftext|> (both stop InternVL3's generate)."""
  return tuple(sorted({tokenizer.eos_id, tokenizer.im_end_id, tokenizer.pad_id}))


def generator(model: FaceLLM, tokenizer: Tokenizer, settings: Settings) -> Generator:
  """The cached `Generator` of `model` for these settings."""
  key = (settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k,
         eos_ids(tokenizer), tokenizer.pad_id, settings.decode_stage)
  per_model = _GENERATORS.setdefault(model, {})
  if key not in per_model:
    per_model[key] = Generator(model, max_new_tokens=settings.max_new_tokens, eos_ids=key[4],
                               pad_id=tokenizer.pad_id, temperature=settings.temperature,
                               top_p=settings.top_p, top_k=settings.top_k, stage=settings.decode_stage)
  return per_model[key]


def with_markers(text: str, num_images: int) -> str:
  """`text` with one marker per image: as given, or the images first when it has none
  (one image: "<image>\\n"; several: "Image-1: <image>\\nImage-2: <image>\\n...")."""
  found = text.count(IMAGE_MARKER)
  if found == 0 and num_images == 1:
    return f"{IMAGE_MARKER}\n{text}"
  if found == 0 and num_images > 1:
    return "".join(f"Image-{i}: {IMAGE_MARKER}\n" for i in range(1, num_images + 1)) + text
  if found != num_images:
    raise ValueError(f"the question has {found} {IMAGE_MARKER!r} marker(s) but {num_images} image(s) were "
                     "given; put one marker per image, or none to place every image before the text")
  return text


def load_images(images: Sequence[ImageLike]) -> list[np.ndarray]:
  """uint8 RGB arrays from files or arrays (grayscale/RGBA arrays converted)."""
  return [image_lib.load_image(x) if isinstance(x, (str, os.PathLike)) else image_lib.to_rgb(x) for x in images]


def prepare(config: FaceLLMConfig, tokenizer: Tokenizer, text: str, images: Sequence[ImageLike] = (), *,
            max_tiles: int = 1, system_prompt: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """Prompt ids int32 [L] and pixel_values float32 [tiles, S, S, 3] (None without images)."""
  pixels = [image_lib.preprocess(x, config.vision.image_size, max_tiles=max_tiles) for x in load_images(images)]
  messages = [{"role": "user", "content": with_markers(text, len(pixels))}]
  ids = template.render_prompt(messages, tokenizer, config.image_seq_length, num_tiles=[len(p) for p in pixels],
                               system_prompt=system_prompt)
  return ids, (np.concatenate(pixels) if pixels else None)


def _generate_batch(model, config, tokenizer, items, settings: Settings, batch: int | None = None) -> list[str]:
  """One generator call for [(text, images)], topped up to `batch` rows; pixels concatenated in row order."""
  prompts, pixels = [], []
  for text, images in items:
    ids, pv = prepare(config, tokenizer, text, images, max_tiles=settings.max_tiles,
                      system_prompt=settings.system_prompt)
    prompts.append(ids.tolist())
    if pv is not None:
      pixels.append(pv)
  out = generator(model, tokenizer, settings)(prompts, np.concatenate(pixels) if pixels else None,
                                               seed=settings.seed, batch=batch)
  return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def answer(model: FaceLLM, config: FaceLLMConfig, tokenizer: Tokenizer, text: str,
           images: Sequence[ImageLike] = (), **settings) -> str:
  """The model's answer to one question (greedy unless `temperature` > 0); `settings` as `Settings`."""
  return _generate_batch(model, config, tokenizer, [(text, images)], Settings(**settings))[0]


def stream_answer(model: FaceLLM, config: FaceLLMConfig, tokenizer: Tokenizer, text: str,
                  images: Sequence[ImageLike] = (), **settings) -> Iterator[str]:
  """The answer as text pieces while it is generated; joined, they equal `answer(...)`.

  Each piece is the newly decoded text; a token that ends inside a multi-byte character is held
  back until the character is complete, so no piece carries a replacement character that the
  full answer does not.
  """
  s = Settings(**settings)
  ids, pixels = prepare(config, tokenizer, text, images, max_tiles=s.max_tiles, system_prompt=s.system_prompt)
  tokens, emitted = [], ""
  for token in generator(model, tokenizer, s).stream(ids.tolist(), pixels, seed=s.seed):
    tokens.append(token)
    decoded = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(decoded) > len(emitted) and not decoded.endswith("\ufffd"):
      yield decoded[len(emitted):]
      emitted = decoded
  final = tokenizer.decode(tokens, skip_special_tokens=True)
  if len(final) > len(emitted):  # an answer cut off inside a character
    yield final[len(emitted):]


def make_generate_fn(model: FaceLLM, config: FaceLLMConfig, tokenizer: Tokenizer, *, max_new_tokens: int = 32,
                     batch_size: int = 8, **settings) -> facexbench.GenerateFn:
  """A `facexbench.evaluate` generate_fn: prompts in chunks of `batch_size`, greedy by default.

  A short last chunk is topped up with dummy rows (done from the start), so every call has the
  same batch shape and the compiled code is reused.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  s = Settings(max_new_tokens=max_new_tokens, **settings)

  def generate_fn(prompts: list[facexbench.EvalPrompt]) -> list[str]:
    answers = []
    for start in range(0, len(prompts), batch_size):
      chunk = [(p.text, p.image_paths) for p in prompts[start:start + batch_size]]
      answers += _generate_batch(model, config, tokenizer, chunk, s, batch=batch_size)
    return answers

  return generate_fn
