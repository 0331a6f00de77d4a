"""The Grain input pipeline: FairFaceGPT records -> fixed-shape, checkpointable training batches.

  source -> shuffle(seed, new order each epoch) -> repeat -> this process's slice
         -> record_to_example (RGB, resize/tile, chat template, tokenize, mask, truncate)
         -> skip examples that do not fit (counted) -> pack or pad
         -> batch (images into their slots, real ones first) -> [mp_prefetch] -> normalize

`record_to_example` is a pure function of one record; after it, arrays are only arranged, and
the pixels normalized at the very end. The conversion runs on the `MapDataset` side, so Grain's
read threads already overlap it inside each process (PIL resizing releases the GIL);
`worker_count` adds processes.

Batch (every step the same shapes; B = batch_size, T = seq_len, M = max_images_per_row):
  input_ids int32 [B, T], targets int32 [B, T] (the next token), loss_mask float32 [B, T] (1 where
  the target is an assistant token), positions int32 [B, T] (restart at each packed example),
  segment_ids int32 [B, T] (1.. per packed example, 0 = padding), num_images int32 [B] (real
  images/tiles per row), pixel_values float32 [B * M, S, S, 3]: the real images first, in order of
  appearance (row-major, then left to right), zero images after them.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from absl import logging
from grain.experimental import FirstFitPackIterDataset

from facellm_jax.input import image as image_lib
from facellm_jax.input import template
from facellm_jax.input import tokenizer as tok_lib

# An endless stream in which nothing fits would otherwise spin forever.
_MAX_CONSECUTIVE_DROPS = 1000
# Fewest non-image tokens of a training example: <|im_start|>user\n<img></img>\n<|im_end|>\n
# <|im_start|>assistant\n, one answer token and <|im_end|>, less one for the target shift.
_MIN_TEXT_TOKENS = 12


class DatasetError(ValueError):
  """A dataset directory that cannot be read: damaged metadata or a damaged ArrayRecord shard."""


# What the readers raise on damaged bytes: riegeli's "Corrupted Riegeli/records file" (RuntimeError),
# protobuf's ParseError and json's JSONDecodeError (ValueErrors), a missing shard (OSError).
READ_ERRORS = (RuntimeError, ValueError, OSError)


def open_tfds_source(data_dir: str | os.PathLike, split: str = "train") -> Sequence[dict[str, Any]]:
  """The random-access ArrayRecord data source of a TFDS dataset directory written by data_gen.

  The first record of every shard is read here, so a damaged metadata file or a truncated shard
  (its footer is at the end) is one `DatasetError` naming the file, before any training starts.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  from google.protobuf import json_format  # pylint: disable=g-import-not-at-top

  data_dir = os.fspath(data_dir)
  try:
    builder = tfds.builder_from_directory(data_dir)
  except (*READ_ERRORS, json_format.ParseError) as e:
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
      raise FileNotFoundError(
          f"{data_dir} is not a TFDS dataset directory (no dataset_info.json); expected the output "
          "directory of `python -m data_gen generate`") from e
    raise DatasetError(f"{data_dir}: {_damaged_metadata(data_dir)} is damaged ({_one_line(e)}); "
                       "regenerate the dataset (or restore that file)") from e
  if split not in builder.info.splits:
    raise ValueError(f"dataset {data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}")
  info = builder.info.splits[split]
  source = builder.as_data_source(split=split)
  first = 0
  for filename, length in zip(info.filenames, info.shard_lengths):
    try:
      source[first]
    except READ_ERRORS as e:
      raise DatasetError(f"{data_dir}: shard {filename} is damaged ({_one_line(e)}); regenerate the "
                         "dataset (a rerun of `data_gen generate` with a fresh --out)") from e
    first += length
  return source


def _damaged_metadata(data_dir: str) -> str:
  """Which of the dataset's JSON files does not parse (the metadata when both do)."""
  for name in ("dataset_info.json", "features.json"):
    try:
      with open(os.path.join(data_dir, name), "rb") as f:
        json.load(f)
    except (OSError, ValueError):
      return name
  return "the dataset metadata"


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _text(value: Any) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_text(record: Mapping[str, Any]) -> str:
  """A record's question and answer as one text: what a tokenizer for this data is trained on."""
  return f"{_text(record['question'])}\n{_text(record['answer'])}"


def fit_example(ids: np.ndarray, loss_mask: np.ndarray, pixel_values: np.ndarray, *, seq_len: int,
                image_token_id: int, num_image_tokens: int) -> dict[str, np.ndarray] | None:
  """Shifts a rendered conversation into (input, next-token target) pairs of at most `seq_len`.

  Too long: cut from the end (the answer goes first), but never inside an image's placeholder run
  (the whole image goes, with its tiles). None when no assistant token would remain as a target,
  i.e. when the prompt alone does not fit.
  """
  cut = min(len(ids), seq_len + 1)  # keep ids[:cut]: inputs ids[:cut-1], targets ids[1:cut].
  spans = template.image_spans(ids, image_token_id)
  for start, end in spans:
    if start < cut - 1 < end:
      cut = start
      break
  answer = np.flatnonzero(loss_mask)
  if not answer.size or answer[0] >= cut:
    return None
  kept_tiles = sum((end - start) // num_image_tokens for start, end in spans if end <= cut - 1)
  return {
      "input_ids": ids[:cut - 1],
      "targets": ids[1:cut],
      "loss_mask": loss_mask[1:cut],
      "pixel_values": pixel_values[:kept_tiles],
  }


def record_to_example(record: Mapping[str, Any], tokenizer: tok_lib.Tokenizer, *, image_size: int,
                      num_image_tokens: int, seq_len: int, max_tiles: int = 1,
                      system_prompt: str | None = None) -> dict[str, np.ndarray] | None:
  """One (image, question, answer) record -> an unpadded example, or None if its prompt is too long.

  The user turn is `<image>\\n{question}` and the assistant turn is the answer, after the optional
  system message: what LLaMA-Factory's intern_vl template renders for a ShareGPT FairFaceGPT record.
  Its `pixel_values` are the resized uint8 tiles; they are normalized once batched.
  """
  missing = [k for k in ("image", "question", "answer") if k not in record]
  if missing:
    raise KeyError(f"record is missing {missing}; expected at least image, question, answer "
                   f"(got {sorted(record)})")
  tiles = image_lib.tiles(record["image"], image_size, max_tiles=max_tiles)
  messages = [
      {"role": "user", "content": f"{template.IMAGE_MARKER}\n{_text(record['question'])}"},
      {"role": "assistant", "content": _text(record["answer"])},
  ]
  ids, mask = template.render_conversation(
      messages, tokenizer, num_image_tokens, num_tiles=[len(tiles)], system_prompt=system_prompt)
  return fit_example(ids, mask, tiles, seq_len=seq_len, image_token_id=tokenizer.image_token_id,
                     num_image_tokens=num_image_tokens)


def record_stream(source: Sequence[Any], *, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """This process's records in training order: a fresh permutation per epoch, then every
  `process_count`-th record, so the processes' shares of an epoch are disjoint and cover it."""
  if not len(source):
    raise ValueError("the data source is empty")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  return ds[process_index::process_count]


_SKIP_STATE_KEYS = frozenset({"parent", "dropped"})


class _SkipUnfit(grain.IterDataset):
  """Drops the Nones of examples that did not fit, counting them in the (checkpointed) state."""

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipUnfitIterator(self._parent.__iter__(), self._seq_len)


class _SkipUnfitIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self.dropped = 0

  def __next__(self):
    for _ in range(_MAX_CONSECUTIVE_DROPS):
      example = next(self._parent)
      if example is not None:
        return example
      self.dropped += 1
      if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, ...: visible but not flooding.
        logging.warning("input: %d examples dropped so far: prompt longer than seq_len=%d",
                        self.dropped, self._seq_len)
    raise ValueError(f"{_MAX_CONSECUTIVE_DROPS} examples in a row do not fit in seq_len="
                     f"{self._seq_len}: the prompt alone (image placeholders included) is longer; "
                     "raise seq_len or use fewer image tokens/tiles")

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "dropped": self.dropped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.dropped = state["dropped"]


def dropped_examples(state: Any) -> int:
  """How many examples were skipped as too long, from an iterator state (summed over workers)."""
  if isinstance(state, dict):
    own = state.get("dropped", 0) if _SKIP_STATE_KEYS <= state.keys() else 0
    return own + sum(dropped_examples(v) for v in state.values())
  if isinstance(state, (list, tuple)):
    return sum(dropped_examples(v) for v in state)
  return 0


def _pad(example: dict[str, np.ndarray], *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One example per row, padded to `seq_len` tokens (its images are placed by `_Collate`)."""
  n = len(example["input_ids"])
  row = {
      "input_ids": np.full(seq_len, pad_id, np.int32),
      "targets": np.full(seq_len, pad_id, np.int32),
      "loss_mask": np.zeros(seq_len, np.float32),
      "positions": np.zeros(seq_len, np.int32),
      "segment_ids": np.zeros(seq_len, np.int32),
      "pixel_values": [example["pixel_values"]],
  }
  for key in ("input_ids", "targets", "loss_mask"):
    row[key][:n] = example[key]
  row["positions"][:n] = np.arange(n)
  row["segment_ids"][:n] = 1
  return row


def _with_image_slots(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A one-byte-per-image stand-in the packer counts against max_images_per_row, so the pixels
  themselves ride along as a per-row list instead of being copied into packing buffers."""
  return {**example, "image_slots": np.zeros(len(example["pixel_values"]), np.int8)}


def _from_packed(row: dict[str, Any]) -> dict[str, Any]:
  return {
      "input_ids": row["input_ids"],
      "targets": row["targets"],
      "loss_mask": row["loss_mask"],
      "positions": row["input_ids_positions"],
      "segment_ids": row["input_ids_segment_ids"],
      "pixel_values": list(row["pixel_values"]),
  }


class _Collate:
  """Grain `batch_fn`: stacks the token fields and copies each row's uint8 images into
  [B * M, ...], real ones first in reading order, zeros after them.

  In an `mp_prefetch` worker Grain asks for shared-memory output, so the batch reaches the main
  process without another copy.
  """

  def __init__(self, max_images: int):
    self._max_images = max_images
    self._shared = False

  def enable_shared_memory_output(self) -> None:
    self._shared = True

  def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "pixel_values"}
    shape = (len(rows) * self._max_images, *rows[0]["pixel_values"][0].shape[1:])
    # A new shared-memory block is zero-filled, like np.zeros.
    pixels = (grain.multiprocessing.SharedMemoryArray(shape, np.uint8) if self._shared
              else np.zeros(shape, np.uint8))
    counts = np.zeros(len(rows), np.int32)
    offset = 0
    for i, row in enumerate(rows):
      for images in row["pixel_values"]:
        pixels[offset:offset + len(images)] = images
        offset += len(images)
        counts[i] += len(images)
    batch["pixel_values"] = pixels
    batch["num_images"] = counts
    return batch


def _normalize_pixels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """uint8 -> normalized float32, the padding images left at zero.

  Last, in the consuming process: workers hand over 4x fewer bytes, and float32 pages written in
  fresh shared memory (no huge pages) cost more than the normalization itself.
  """
  images = batch["pixel_values"]
  pixels = np.zeros(images.shape, np.float32)
  real = int(batch["num_images"].sum())
  image_lib.normalize(images[:real], out=pixels[:real])
  return {**batch, "pixel_values": pixels}


def image_slots(seq_len: int, num_image_tokens: int, max_images_per_row: int | None = None, *,
                max_tiles: int = 1, packing: bool = False) -> int:
  """Image slots M per row, as `make_dataset` lays them out (`max_images_per_row` 0 or None: the
  default there); the compile-only path sizes its abstract batch with the same answer."""
  images_per_example = 1 if max_tiles == 1 else max_tiles + 1
  if not max_images_per_row:
    per_row = seq_len // (images_per_example * num_image_tokens + _MIN_TEXT_TOKENS) if packing else 1
    return images_per_example * max(per_row, 1)
  if max_images_per_row < images_per_example:
    raise ValueError(f"max_images_per_row={max_images_per_row} cannot hold one example's "
                     f"{images_per_example} images (max_tiles={max_tiles}, thumbnail included)")
  return max_images_per_row


def make_dataset(source: Sequence[Any], tokenizer: tok_lib.Tokenizer, *, image_size: int,
                 num_image_tokens: int, seq_len: int, batch_size: int,
                 max_images_per_row: int | None = None, max_tiles: int = 1, packing: bool = False,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 system_prompt: str | None = None, worker_count: int = 0,
                 read_threads: int = 2) -> grain.IterDataset:
  """This process's training batches (see the module docstring for their fields).

  Args:
    source: a random-access sequence of records (`open_tfds_source`, or any list of dicts with
      image, question, answer).
    tokenizer: the model's tokenizer.
    image_size: the vision tower's input size S.
    num_image_tokens: placeholders per image tile (the config's `image_seq_length`).
    seq_len: tokens per row T; longer conversations are truncated (see `fit_example`).
    batch_size: rows per batch of this process.
    max_images_per_row: image slots per row M; when packing, also a packing limit. Default (None
      or 0; `image_slots`): one example's images, or with packing as many as the shortest possible
      examples could need, so only tokens limit the packing. The vision tower runs on all B * M
      slots: set it near the typical number of images per row to skip empty ones.
    max_tiles: InternVL dynamic tiling up to this many tiles (+1 thumbnail); 1 = one resized image.
    packing: pack several examples per row (never splitting one) instead of one padded example.
    seed: shuffling seed (each epoch uses its own permutation).
    shuffle: shuffle records; off, every epoch is in source order.
    num_epochs: None repeats forever (train by steps); the last partial batch is dropped.
    process_index, process_count: this process's slice; default `jax.process_index()/count()`.
    system_prompt: system message before each conversation ('' or None: none); the config's
      `data.system_prompt`, by default the intern_vl template's as the reference trains.
    worker_count: >0 runs the pipeline in that many processes (`mp_prefetch`); the batches are then
      a deterministic interleaving that depends on `worker_count`.
    read_threads: threads per process converting records.

  Returns:
    A `grain.IterDataset`; its iterator's `get_state()`/`set_state()` resume exactly.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                      ("image_size", image_size), ("num_image_tokens", num_image_tokens)):
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {value}")
  max_images_per_row = image_slots(seq_len, num_image_tokens, max_images_per_row,
                                   max_tiles=max_tiles, packing=packing)

  ds = record_stream(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                     process_index=process_index, process_count=process_count)
  ds = ds.map(functools.partial(
      record_to_example, tokenizer=tokenizer, image_size=image_size,
      num_image_tokens=num_image_tokens, seq_len=seq_len, max_tiles=max_tiles,
      system_prompt=system_prompt))
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(4 * read_threads, 8))
  it = _SkipUnfit(ds.to_iter_dataset(read, allow_nones=True), seq_len)
  if packing:
    pad = tokenizer.pad_id
    it = FirstFitPackIterDataset(
        it.map(_with_image_slots),
        length_struct={"input_ids": seq_len, "targets": seq_len, "loss_mask": seq_len,
                       "image_slots": max_images_per_row},
        padding_struct={"input_ids": pad, "targets": pad, "loss_mask": 0, "image_slots": 0},
        meta_features=("targets", "loss_mask", "image_slots", "pixel_values"),
        num_packing_bins=batch_size,
        shuffle_bins=False)
    it = it.map(_from_packed)
  else:
    it = it.map(functools.partial(_pad, seq_len=seq_len, pad_id=tokenizer.pad_id))
  it = it.batch(batch_size, drop_remainder=True, batch_fn=_Collate(max_images_per_row))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; callers outside absl.app too.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it.map(_normalize_pixels)
