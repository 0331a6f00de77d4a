"""Image preprocessing: InternVL's numbers, tiling, and readable errors."""

import numpy as np
import pytest
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from facellm_jax.input import image as image_lib

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def test_normalization_matches_the_hand_computation():
  # A constant image stays constant through any resize, so every output pixel is known.
  color = np.array([0, 128, 255], np.uint8)
  out = image_lib.preprocess(np.broadcast_to(color, (37, 53, 3)).copy(), 28)
  expected = [-0.485 / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]
  assert out.shape == (1, 28, 28, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=0, atol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0], [-2.1179039, 0.2051821, 2.64], atol=1e-6)


def test_normalize_into_a_given_buffer():
  img = np.random.default_rng(2).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  buffer = np.full((4, 5, 7, 3), 9.0, np.float32)
  assert image_lib.normalize(img, out=buffer[1:3]) is not None
  np.testing.assert_allclose(buffer[1:3], (img / 255.0 - MEAN) / STD, atol=1e-6)
  assert (buffer[0] == 9).all() and (buffer[3] == 9).all()


def test_resize_is_pil_bicubic_on_uint8():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (61, 45, 3), dtype=np.uint8)
  ref = np.asarray(Image.fromarray(img).resize((28, 28), Image.Resampling.BICUBIC))
  np.testing.assert_allclose(image_lib.preprocess(img, 28)[0], image_lib.normalize(ref), atol=0)
  assert image_lib.resize(img, 61, 45) is img


@pytest.mark.parametrize("shape,tiles", [((300, 700, 3), 3), ((500, 260, 3), 3), ((50, 60, 3), 1)])
def test_matches_transformers_gotocr2_processor_of_internvl_hf(shape, tiles):
  img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  processor = GotOcr2ImageProcessorPil(size={"height": 112, "width": 112}, image_mean=MEAN.tolist(),
                                       image_std=STD.tolist())
  ref = processor(images=[img], return_tensors="np", crop_to_patches=True, max_patches=6)
  ours = image_lib.preprocess(img, 112, max_tiles=6)
  assert ref["num_patches"].tolist() == [tiles] and ours.shape == (tiles, 112, 112, 3)
  np.testing.assert_allclose(ours, ref["pixel_values"].transpose(0, 2, 3, 1), atol=2e-6)
  single = processor(images=[img], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(image_lib.preprocess(img, 112), single, atol=2e-6)


def test_grid_choice_prefers_the_closest_aspect_ratio_and_caps_small_images():
  assert image_lib.best_grid(300, 900, 448, 1, 6) == (3, 1)
  assert image_lib.best_grid(900, 450, 448, 1, 6) == (1, 2)
  assert image_lib.best_grid(1000, 1000, 448, 1, 6) == (2, 2)  # tie with 1x1, large: more tiles
  assert image_lib.best_grid(300, 300, 448, 1, 6) == (1, 1)  # tie, small image: no blow-up
  with pytest.raises(ValueError, match="min_tiles <= max_tiles"):
    image_lib.best_grid(10, 10, 448, 3, 2)


def test_tiles_are_row_major_with_the_thumbnail_last():
  colors = np.arange(6 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # 2 rows x 3 columns
  img = np.repeat(np.repeat(colors, 16, axis=0), 16, axis=1)  # 32 x 48, 16 px blocks
  tiles = image_lib.preprocess(img, 16, max_tiles=6)
  assert tiles.shape == (7, 16, 16, 3)
  for i, (r, c) in enumerate([(r, c) for r in range(2) for c in range(3)]):
    np.testing.assert_allclose(tiles[i], image_lib.normalize(np.broadcast_to(colors[r, c], (16, 16, 3))),
                               atol=1e-6)
  thumb = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BICUBIC))
  np.testing.assert_allclose(tiles[6], image_lib.normalize(thumb), atol=1e-6)
  assert image_lib.preprocess(img, 16, max_tiles=6, use_thumbnail=False).shape == (6, 16, 16, 3)


def test_grayscale_and_rgba_become_rgb():
  gray = np.full((8, 8), 77, np.uint8)
  rgba = np.dstack([np.full((8, 8, 3), 77, np.uint8), np.zeros((8, 8), np.uint8)])
  ref = image_lib.preprocess(np.full((8, 8, 3), 77, np.uint8), 8)
  for img in (gray, gray[..., None], rgba):
    np.testing.assert_array_equal(image_lib.preprocess(img, 8), ref)
  with pytest.raises(ValueError, match="expected a uint8 or uint16 image"):
    image_lib.preprocess(np.zeros((8, 8, 3), np.float32), 8)
  with pytest.raises(ValueError, match=r"got \(8, 8, 2\)"):
    image_lib.preprocess(np.zeros((8, 8, 2), np.uint8), 8)


def test_load_image_reads_rgb_and_explains_unreadable_files(tmp_path):
  Image.fromarray(np.full((5, 7), 200, np.uint8), mode="L").save(tmp_path / "gray.png")
  loaded = image_lib.load_image(tmp_path / "gray.png")
  assert loaded.shape == (5, 7, 3) and loaded.dtype == np.uint8 and (loaded == 200).all()
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
  with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg: expected a JPEG/PNG"):
    image_lib.load_image(tmp_path / "broken.jpg")
  with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
    image_lib.load_image(tmp_path / "missing.png")


def test_16_bit_greyscale_png_is_scaled_by_255_over_65535_not_clipped(tmp_path):
  values = np.random.default_rng(4).integers(0, 65536, (9, 11), dtype=np.uint16)
  values[0, :3] = (0, 257 * 100, 65535)
  Image.fromarray(values).save(tmp_path / "deep.png")
  with Image.open(tmp_path / "deep.png") as img:
    assert img.mode.startswith("I;16")  # what PIL decodes a 16-bit greyscale PNG to
  expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  loaded = image_lib.load_image(tmp_path / "deep.png")
  assert loaded.shape == (9, 11, 3)
  for channel in range(3):
    np.testing.assert_array_equal(loaded[..., channel], expected)
  assert tuple(loaded[0, :3, 0]) == (0, 100, 255)
  np.testing.assert_array_equal(image_lib.to_rgb(values), loaded)
  with Image.open(tmp_path / "deep.png") as img:  # mode I: the same samples as 32-bit ints
    np.testing.assert_array_equal(np.asarray(image_lib.rgb_image(img.convert("I"))), loaded)
