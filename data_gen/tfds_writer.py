"""Writes QA records as a TFDS-format ArrayRecord dataset, without TensorFlow, atomically.

Records are serialized by TFDS's own `FeaturesDict` and written with `array_record`; the
metadata (dataset_info.json, features.json) by TFDS's `DatasetInfo`, so
`tfds.builder_from_directory(OUT).as_data_source(split=...)` and Grain read the result.

Atomicity: a dataset is visible only through OUT/dataset_info.json, whose split templates
point into one data directory. A write stages its shards in a hidden directory, renames it to
a fresh `data-<id>` (still invisible), then replaces dataset_info.json in one rename (the
commit) and removes the old data directory. features.json never changes, because the feature
set is fixed. A crash leaves either the old dataset or the new one, never a mix; OUT also
holds the journal, which is why the directory itself is not swapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from typing import Iterable, Mapping, Sequence

from array_record.python import array_record_module
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info, file_adapters, naming, utils
from tensorflow_datasets.core import splits as split_lib

from facellm_jax.input import image as image_lib

DATASET_NAME = "fairfacegpt"
VERSION = "1.0.0"
# The synthetic world's ground-truth columns; stored as strings ("" where a CSV lacks one).
EXTRA_LABEL_COLUMNS = ("expression", "head_pose", "roll", "eyes", "eyeglasses", "facial_hair",
                       "hair_length", "hair_color", "lighting", "brightness", "sharpness",
                       "jpeg_quality", "background")
TEXT_FEATURES = ("image_id", "attribute", "question", "answer", "age", "gender", "race",
                 "source") + EXTRA_LABEL_COLUMNS
RECORDS_PER_SHARD = 10_000
_DATA_PREFIX = "data-"


@dataclasses.dataclass(frozen=True)
class QA:
  attribute: str
  question: str
  answer: str
  source: str


@dataclasses.dataclass(frozen=True)
class ImageQA:
  """One image with all of its QA pairs (its records are written together)."""
  image_id: str
  path: str
  labels: Mapping[str, str]
  qa: Sequence[QA]


def features() -> tfds.features.FeaturesDict:
  """The dataset's fixed feature set: the same for every run, so features.json never changes."""
  spec = {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")}
  spec.update({name: tfds.features.Text() for name in TEXT_FEATURES})
  return tfds.features.FeaturesDict(spec)


def split_of(image_id: str, seed: int, val_fraction: float) -> str:
  """Deterministic, per image (never per QA pair), stable as images are added or removed."""
  return "validation" if _unit_hash(image_id, seed) < val_fraction else "train"


def assign_splits(image_ids: Sequence[str], seed: int, val_fraction: float) -> dict[str, str]:
  """`split_of` for each image; if that leaves validation empty, its lowest-hash image moves."""
  splits = {i: split_of(i, seed, val_fraction) for i in image_ids}
  if val_fraction > 0 and len(image_ids) > 1 and "validation" not in splits.values():
    splits[min(image_ids, key=lambda i: _unit_hash(i, seed))] = "validation"
  return splits


def _unit_hash(image_id: str, seed: int) -> float:
  digest = hashlib.sha256(f"split|{seed}|{image_id}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def jpeg_bytes(path: str) -> bytes:
  """The original file when it is an RGB or grey JPEG; otherwise a JPEG of the shared decode."""
  with open(path, "rb") as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
      return data
    out = io.BytesIO()
    image_lib.rgb_image(image).save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_dataset(out_dir: str, images: Iterable[ImageQA], splits: Mapping[str, str],
                  description: str = "") -> dict[str, int]:
  """Atomically (re)writes the dataset in `out_dir`; returns the record count per split."""
  images = list(images)
  counts: dict[str, int] = {}
  for item in images:
    counts[splits[item.image_id]] = counts.get(splits[item.image_id], 0) + len(item.qa)
  counts = {s: n for s, n in sorted(counts.items()) if n}
  if not counts:
    raise ValueError("no records to write")
  os.makedirs(out_dir, exist_ok=True)
  data_name = f"{_DATA_PREFIX}{time.time_ns():x}"
  template = data_name + "/{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  staging = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
  _chmod_default(staging, 0o777)
  feats = features()
  split_bytes = {}
  for split, total in counts.items():
    num_shards = math.ceil(total / RECORDS_PER_SHARD)
    records = (feats.serialize_example(r)
               for item in images if splits[item.image_id] == split for r in _examples(item))
    split_bytes[split] = 0
    for shard in range(num_shards):
      path = os.path.join(staging, _shard_name(split, shard, num_shards))
      writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      for _ in range(min(RECORDS_PER_SHARD, total - shard * RECORDS_PER_SHARD)):
        record = next(records)
        split_bytes[split] += len(record)
        writer.write(record)
      writer.close()
      _fsync(path)
  data_dir = os.path.join(out_dir, data_name)
  os.rename(staging, data_dir)
  _fsync(out_dir)
  _write_metadata(out_dir, feats, template, counts, split_bytes, description)
  for name in os.listdir(out_dir):
    if (name.startswith(_DATA_PREFIX) and name != data_name) or name.startswith(".staging-"):
      shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
  return counts


def _examples(item: ImageQA) -> Iterable[dict[str, object]]:
  image = jpeg_bytes(item.path)
  labels = {k: item.labels.get(k, "") for k in ("age", "gender", "race") + EXTRA_LABEL_COLUMNS}
  for qa in item.qa:
    yield {"image": image, "image_id": item.image_id, "attribute": qa.attribute,
           "question": qa.question, "answer": qa.answer, "source": qa.source, **labels}


def _shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{DATASET_NAME}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def _write_metadata(out_dir: str, feats: tfds.features.FeaturesDict, template: str, counts: Mapping[str, int],
                    split_bytes: Mapping[str, int], description: str) -> None:
  """TFDS's own DatasetInfo writes the JSON; it lands in OUT by rename (the commit)."""
  split_infos = []
  for split, total in counts.items():
    num_shards = math.ceil(total / RECORDS_PER_SHARD)
    lengths = [min(RECORDS_PER_SHARD, total - i * RECORDS_PER_SHARD) for i in range(num_shards)]
    file_template = naming.ShardedFileTemplate(
        data_dir=out_dir, template=template, dataset_name=DATASET_NAME, split=split,
        filetype_suffix="array_record")
    split_infos.append(split_lib.SplitInfo(name=split, shard_lengths=lengths,
                                           num_bytes=split_bytes[split],
                                           filename_template=file_template))
  identity = dataset_info.DatasetIdentity(name=DATASET_NAME, version=utils.Version(VERSION),
                                          data_dir=out_dir, module_name="")
  info = dataset_info.DatasetInfo(builder=identity, features=feats, description=description)
  info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
  info.set_splits(split_lib.SplitDict(split_infos))
  meta = tempfile.mkdtemp(prefix=".staging-meta-", dir=out_dir)
  info.write_to_directory(meta)
  for name in ("features.json", "dataset_info.json"):  # dataset_info.json last: the commit
    _fsync(os.path.join(meta, name))
    os.replace(os.path.join(meta, name), os.path.join(out_dir, name))
  _fsync(out_dir)
  shutil.rmtree(meta, ignore_errors=True)


def write_json(path: str, obj: object) -> None:
  """Atomic JSON file (temp + fsync + rename), so a reader never sees half a report."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  _chmod_default(tmp, 0o666)
  os.replace(tmp, path)


def _chmod_default(path: str, mode: int) -> None:
  """tempfile creates private (0600/0700) entries; outputs get the usual umask modes."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, mode & ~umask)


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
