"""InternVL image preprocessing: RGB, bicubic resize to the vision size, ImageNet normalization, NHWC.

Matches InternVL's own `load_image`/`dynamic_preprocess` (PIL bicubic on uint8, then /255 and
mean/std) and the PIL backend of transformers' `GotOcr2ImageProcessor` that `InternVL*-hf` uses,
so a checkpoint sees the pixels it was trained on.

`rgb_image` / `to_rgb` are the one decode of every image reader in the project (training, chat,
evaluation, and data_gen's checks, dataset writer and API uploads): 16-bit pixels are scaled by
255/65535, where PIL's `convert("RGB")` clips them at 255 and a 16-bit greyscale PNG comes out
almost white. This module imports only numpy and PIL, so data_gen can use it without jax.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (x / 255 - mean) / std folded into one multiply-add over the uint8 pixels.
_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, np.float64))).astype(np.float32)
_OFFSET = (-np.asarray(IMAGENET_MEAN, np.float64) / np.asarray(IMAGENET_STD)).astype(np.float32)


# PIL modes of 16-bit samples: PNG and TIFF decode 16-bit greyscale to I;16* (or I, 32-bit ints
# holding 0..65535, after some operations).
_16_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def from_16_bit(pixels: np.ndarray) -> np.ndarray:
  """uint8 from 16-bit samples: round(v * 255 / 65535), so 65535 -> 255 and 257 * k -> k."""
  wide = np.clip(pixels, 0, 65535).astype(np.uint32)
  return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def rgb_image(img: Image.Image) -> Image.Image:
  """An opened image as 8-bit RGB: 16-bit greyscale scaled (not clipped), alpha dropped, palette
  and CMYK converted as PIL's `convert("RGB")` does."""
  if img.mode in _16_BIT_MODES:
    return Image.fromarray(from_16_bit(np.asarray(img)), mode="L").convert("RGB")
  return img.convert("RGB")


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as uint8 RGB [H, W, 3]."""
  try:
    with Image.open(path) as img:
      return np.asarray(rgb_image(img))
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {path}") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: expected a JPEG/PNG/WebP file that PIL can decode "
                     f"({type(e).__name__}: {e})") from e


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] from a grayscale, RGB or RGBA uint8 or uint16 array (16-bit scaled as in
  `rgb_image`, alpha dropped as PIL's convert does)."""
  image = np.asarray(image)
  if image.dtype == np.uint16:
    image = from_16_bit(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 or uint16 image, got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                     f"got {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of a uint8 RGB image, in PIL exactly as InternVL does."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


@functools.lru_cache(maxsize=16)
def _row_affine(width: int) -> tuple[np.ndarray, np.ndarray]:
  return np.tile(_SCALE, width), np.tile(_OFFSET, width)


def normalize(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [..., 3] -> float32 `(x / 255 - mean) / std`, into `out` (same shape) if given.

  Applied to whole pixel rows (W * 3 values) so numpy's inner loop is long, not 3 wide: 7x faster,
  and this is most of the pipeline's CPU time.
  """
  width = image.shape[-2] if image.ndim > 1 else 1
  scale, offset = _row_affine(width)
  if out is None:
    out = np.empty(image.shape, np.float32)
  rows = out.reshape(-1, width * 3)  # a view: `out` must be contiguous, as a new array is.
  np.multiply(image.reshape(-1, width * 3), scale, out=rows)
  rows += offset
  return out


@functools.lru_cache(maxsize=64)
def _grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
  """(columns, rows) grids with min..max tiles, fewest tiles first (ties: by columns, then rows)."""
  grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
           if min_tiles <= c * r <= max_tiles]
  return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
  """InternVL's grid choice: the closest aspect ratio; on a tie, more tiles while the image is larger
  than half the tiled area (so small images are not blown up)."""
  if not 1 <= min_tiles <= max_tiles:
    raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
  aspect, area = width / height, width * height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in _grids(min_tiles, max_tiles):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
      best = (cols, rows)
  return best


def tiles(image: np.ndarray, image_size: int, *, max_tiles: int = 1, min_tiles: int = 1,
          use_thumbnail: bool = True) -> np.ndarray:
  """Resized RGB tiles uint8 [num_tiles, S, S, 3] of one image (`preprocess` before `normalize`).

  With `max_tiles == 1` the whole image is resized to S x S (FaceLLM's setting for face crops).
  Otherwise InternVL's dynamic tiling: resize to the best grid of S x S tiles, row-major, plus a
  whole-image thumbnail last when there is more than one tile.
  """
  image = to_rgb(image)
  if max_tiles == 1:
    return resize(image, image_size, image_size)[None]
  cols, rows = best_grid(image.shape[0], image.shape[1], image_size, min_tiles, max_tiles)
  canvas = resize(image, rows * image_size, cols * image_size)
  grid = canvas.reshape(rows, image_size, cols, image_size, 3).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(rows * cols, image_size, image_size, 3)
  if use_thumbnail and rows * cols > 1:
    return np.concatenate([grid, resize(image, image_size, image_size)[None]])
  return grid


def preprocess(image: np.ndarray, image_size: int, **tiling) -> np.ndarray:
  """Model-ready float32 [num_tiles, S, S, 3] of one image; `tiling` as in `tiles`."""
  return normalize(tiles(image, image_size, **tiling))
