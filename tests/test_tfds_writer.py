"""TFDS ArrayRecord writer: readable by TFDS and Grain, split by image, replaced atomically."""

import base64
import io
import os

import grain
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_gen import fairface, tfds_writer
from data_gen.backends import openai_chat
from data_gen.tfds_writer import QA, ImageQA

COLORS = {"a.jpg": (220, 30, 30), "b.png": (30, 220, 30), "c.jpg": (30, 30, 220)}


@pytest.fixture
def images(tmp_path):
  out = []
  for name, color in COLORS.items():
    path = str(tmp_path / name)
    Image.fromarray(np.full((12, 20, 3), color, np.uint8)).save(path)
    labels = {"age": "20-29", "gender": "Female", "race": "Indian", "expression": name[0]}
    qa = [QA(attr, f"Q {attr}?", f"{name} {attr}", "offline") for attr in ("pose", "lighting")]
    out.append(ImageQA(name, path, labels, qa))
  return out


def _records(out_dir, split):
  source = tfds.builder_from_directory(out_dir).as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def test_tfds_and_grain_read_what_was_written(tmp_path, images):
  out = str(tmp_path / "ds")
  counts = tfds_writer.write_dataset(out, images, {i.image_id: "train" for i in images})
  assert counts == {"train": 6}
  records = _records(out, "train")
  assert [(r["image_id"], r["attribute"]) for r in records] == [
      (n.encode(), a) for n in COLORS for a in (b"pose", b"lighting")]
  for record in records:
    name = record["image_id"].decode()
    assert record["image"].shape == (12, 20, 3) and record["image"].dtype == np.uint8
    np.testing.assert_allclose(record["image"].mean(axis=(0, 1)), COLORS[name], atol=4)
    assert record["answer"].decode() == f"{name} {record['attribute'].decode()}"
    assert record["expression"] == name[0].encode() and record["head_pose"] == b""
    assert (record["age"], record["gender"], record["race"]) == (b"20-29", b"Female", b"Indian")
  dataset = grain.MapDataset.source(tfds.builder_from_directory(out).as_data_source("train"))
  assert len(dataset) == 6
  assert dataset[3]["question"] == b"Q lighting?"


def test_non_jpeg_is_stored_as_jpeg_and_jpeg_bytes_are_kept(images):
  png = next(i for i in images if i.image_id == "b.png")
  assert tfds_writer.jpeg_bytes(png.path)[:2] == b"\xff\xd8"
  jpg = next(i for i in images if i.image_id == "a.jpg")
  with open(jpg.path, "rb") as f:
    assert tfds_writer.jpeg_bytes(jpg.path) == f.read()


def test_split_is_by_image_deterministic_and_near_the_fraction():
  ids = [f"val/{i}.jpg" for i in range(2000)]
  splits = tfds_writer.assign_splits(ids, seed=3, val_fraction=0.1)
  assert splits == tfds_writer.assign_splits(ids, seed=3, val_fraction=0.1)
  assert 150 < sum(s == "validation" for s in splits.values()) < 250
  assert splits != tfds_writer.assign_splits(ids, seed=4, val_fraction=0.1)
  # Adding images never moves existing ones.
  more = tfds_writer.assign_splits(ids + ["new.jpg"], seed=3, val_fraction=0.1)
  assert all(more[i] == splits[i] for i in ids)
  # A tiny set still gets a validation image when one is asked for.
  assert "validation" in tfds_writer.assign_splits(["a", "b"], 0, 0.01).values()
  assert set(tfds_writer.assign_splits(["a", "b"], 0, 0.0).values()) == {"train"}


def test_validation_split_holds_whole_images(tmp_path, images):
  out = str(tmp_path / "ds")
  splits = {"a.jpg": "train", "b.png": "validation", "c.jpg": "train"}
  assert tfds_writer.write_dataset(out, images, splits) == {"train": 4, "validation": 2}
  assert {r["image_id"] for r in _records(out, "validation")} == {b"b.png"}


def test_rewrite_replaces_the_dataset_and_a_failed_one_leaves_the_old(tmp_path, images,
                                                                      monkeypatch):
  out = str(tmp_path / "ds")
  tfds_writer.write_dataset(out, images, {i.image_id: "train" for i in images})
  tfds_writer.write_dataset(out, images[:1], {i.image_id: "train" for i in images})
  assert len(_records(out, "train")) == 2
  assert len([n for n in os.listdir(out) if n.startswith("data-")]) == 1

  def crash(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(tfds_writer, "_write_metadata", crash)
  with pytest.raises(OSError):
    tfds_writer.write_dataset(out, images, {i.image_id: "train" for i in images})
  assert len(_records(out, "train")) == 2  # still the last committed dataset


def test_write_json_is_complete_and_replaces(tmp_path):
  path = str(tmp_path / "report.json")
  tfds_writer.write_json(path, {"written": 1})
  tfds_writer.write_json(path, {"written": 2, "note": "é"})
  with open(path, encoding="utf-8") as f:
    assert f.read() == '{\n  "written": 2,\n  "note": "é"\n}\n'
  assert os.listdir(tmp_path) == ["report.json"]


def test_16_bit_greyscale_png_keeps_its_tones_in_the_dataset_and_the_upload(tmp_path):
  """The dataset writer, the image check and the OpenAI upload all decode through
  `facellm_jax.input.image.rgb_image`: flat 16-bit blocks keep their 8-bit tone."""
  levels = np.array([[1000, 20000], [40000, 65535]], np.uint16)  # -> 4, 78, 156, 255
  Image.fromarray(np.kron(levels, np.ones((16, 16), np.uint16))).save(tmp_path / "deep.png")
  expected = np.round(levels.astype(np.float64) * 255 / 65535)
  assert fairface.check_image(str(tmp_path / "deep.png")) is None
  uri = openai_chat.image_data_uri(str(tmp_path / "deep.png"))
  for data in (tfds_writer.jpeg_bytes(str(tmp_path / "deep.png")),
               base64.b64decode(uri.split(",", 1)[1])):
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64)
    blocks = decoded.reshape(2, 16, 2, 16)[:, 4:12, :, 4:12].mean(axis=(1, 3))
    np.testing.assert_allclose(blocks, expected, atol=2)
