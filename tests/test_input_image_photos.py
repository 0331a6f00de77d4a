"""Dynamic tiling on real photos equals transformers' GotOcr2 processor (InternVL-hf) pixel for pixel.

As the reference evaluates: 448 px tiles, crop_to_patches with min 1 / max 12 tiles, thumbnail.
transformers' PIL backend is compared here; its torchvision backend (GotOcr2ImageProcessorFast)
chooses the same grid but resamples with torch's antialiased bicubic, a few grey levels apart.
"""

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from facellm_jax.input import image as image_lib

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _grace_hopper() -> np.ndarray:
  with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as img:
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("name, load, tiles", [
    ("astronaut", skimage.data.astronaut, 1),  # 512 x 512: the 2 x 2 tie loses, too small for 4 tiles
    ("grace_hopper", _grace_hopper, 13),  # 600 x 512: a 3 x 4 grid + thumbnail
    ("chelsea", skimage.data.chelsea, 7),  # 300 x 451: 3 x 2 + thumbnail
])
def test_tiles_equal_the_hf_processor_on_photos(name, load, tiles):
  img = load()
  processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, image_mean=MEAN, image_std=STD)
  ref = processor(images=[img], return_tensors="np", crop_to_patches=True, min_patches=1, max_patches=12)
  ours = image_lib.preprocess(img, 448, max_tiles=12)
  assert ref["num_patches"].tolist() == [tiles] and ours.shape == (tiles, 448, 448, 3), name
  np.testing.assert_allclose(ours, ref["pixel_values"].transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
