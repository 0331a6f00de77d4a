"""Face detection and the FairFace-style crop (margin 0.25) on real photos."""

import numpy as np
import pytest
import skimage.data
from matplotlib import cbook
from PIL import Image

from facellm_jax.input import face_crop
from facellm_jax.input.face_crop import Box

# Where the face is, by eye: (x0, y0, x1, y1) boxes that hold the face centre.
PHOTOS = {
    "astronaut": (skimage.data.astronaut, (180, 70, 270, 160)),
    "grace_hopper": (lambda: np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")),
                     (200, 150, 330, 290)),
}


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_finds_the_face_in_a_photo(name):
  load, (x0, y0, x1, y1) = PHOTOS[name]
  faces = face_crop.detect_faces(load())
  assert faces, f"no face found in {name}"
  face = faces[0]
  assert x0 <= face.x + face.w / 2 <= x1 and y0 <= face.y + face.h / 2 <= y1, face
  assert all(face.area >= f.area for f in faces)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_crop_holds_the_face_with_a_quarter_margin_on_each_side(name):
  image = PHOTOS[name][0]()
  face = face_crop.detect_faces(image)[0]
  crop = face_crop.crop_largest_face(image)
  side = round(max(face.w, face.h) * 1.5)
  assert crop.shape == (side, side, 3)
  box = face_crop.crop_box(face)
  # The face sits in the middle, 0.25 of its width from every edge (to a pixel of rounding).
  for gap in (face.x - box.x, face.y - box.y, box.x + box.w - face.x - face.w, box.y + box.h - face.y - face.h):
    assert abs(gap - 0.25 * face.w) <= 1
  assert box.x >= 0 and box.y >= 0 and box.x + side <= image.shape[1] and box.y + side <= image.shape[0]
  np.testing.assert_array_equal(crop, image[box.y:box.y + side, box.x:box.x + side])


def test_crop_past_the_image_edge_is_black_there():
  image = np.random.default_rng(0).integers(1, 256, (100, 80, 3), np.uint8)
  crop = face_crop.crop_face(image, Box(0, 10, 40, 40))  # grows 10 px past the left edge
  assert crop.shape == (60, 60, 3)
  assert not crop[:, :10].any()
  np.testing.assert_array_equal(crop[:, 10:], image[0:60, 0:50])


@pytest.mark.parametrize("image", [skimage.data.coffee(), np.full((200, 200, 3), 128, np.uint8)],
                         ids=["coffee", "grey"])
def test_image_without_a_face_raises_a_clear_error(image):
  with pytest.raises(face_crop.NoFaceError, match=r"no face found in cup\.png \(\d+x\d+ px\)"):
    face_crop.crop_largest_face(image, source="cup.png")
