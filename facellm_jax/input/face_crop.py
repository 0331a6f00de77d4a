"""Find the face in a photo and crop it the way FairFace's images are cropped.

FaceLLM learns from FairFace crops: the face box grown by a margin of 0.25 of its size on every
side (dlib's `get_face_chips(..., padding=0.25)`), square, centred on the face. A photo that is
not such a crop (a portrait, a group shot) should be cropped alike before the model sees it.
Detection is OpenCV's bundled frontal-face Haar cascade: no model download, CPU only (the
`opencv-python-headless<5` pin exists because version 5 ships no cascade files).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

FAIRFACE_MARGIN = 0.25
_CASCADE = "haarcascade_frontalface_default.xml"


class NoFaceError(ValueError):
  """No face was found in an image."""


@dataclasses.dataclass(frozen=True)
class Box:
  """A face rectangle in pixels: top-left corner (x, y), width, height."""
  x: int
  y: int
  w: int
  h: int

  @property
  def area(self) -> int:
    return self.w * self.h


@functools.cache
def _detector():
  import cv2  # pylint: disable=g-import-not-at-top  (only the chat's --detect-face needs OpenCV)

  path = cv2.data.haarcascades + _CASCADE
  detector = cv2.CascadeClassifier(path)
  if detector.empty():
    raise RuntimeError(f"OpenCV could not load its face cascade {path}; install opencv-python-headless<5 "
                       "(version 5 ships no cascade files)")
  return detector


def detect_faces(image: np.ndarray, *, min_fraction: float = 0.1) -> list[Box]:
  """Frontal faces in a uint8 RGB image, largest first.

  Faces narrower than `min_fraction` of the image's shorter side are ignored: they are
  background faces or false detections in texture, and too small to describe anyway.
  """
  import cv2  # pylint: disable=g-import-not-at-top

  gray = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
  smallest = max(24, int(min(gray.shape) * min_fraction))
  found = _detector().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
  boxes = [Box(int(x), int(y), int(w), int(h)) for x, y, w, h in np.reshape(found, (-1, 4))]
  return sorted(boxes, key=lambda b: -b.area)


def crop_box(face: Box, margin: float = FAIRFACE_MARGIN) -> Box:
  """The square crop around `face`: its longer side grown by `margin` of it on each side."""
  side = int(round(max(face.w, face.h) * (1 + 2 * margin)))
  cx, cy = face.x + face.w / 2, face.y + face.h / 2
  return Box(int(round(cx - side / 2)), int(round(cy - side / 2)), side, side)


def crop_face(image: np.ndarray, face: Box, margin: float = FAIRFACE_MARGIN) -> np.ndarray:
  """The FairFace-style crop of `face`; parts outside the image are black, as dlib's chips are."""
  box = crop_box(face, margin)
  out = np.zeros((box.h, box.w, image.shape[2]), image.dtype)
  y0, x0 = max(box.y, 0), max(box.x, 0)
  y1, x1 = min(box.y + box.h, image.shape[0]), min(box.x + box.w, image.shape[1])
  out[y0 - box.y:y1 - box.y, x0 - box.x:x1 - box.x] = image[y0:y1, x0:x1]
  return out


def crop_largest_face(image: np.ndarray, margin: float = FAIRFACE_MARGIN, *, source: str = "the image") -> np.ndarray:
  """The FairFace-style crop of the largest face; `NoFaceError` names `source` when there is none."""
  faces = detect_faces(image)
  if not faces:
    raise NoFaceError(f"no face found in {source} ({image.shape[1]}x{image.shape[0]} px); use a photo with a "
                      "frontal face, or pass an already cropped face without --detect-face")
  return crop_face(image, faces[0], margin)
