"""FairFace label CSV + image root -> the faces a generation run may send.

A bad row (unknown label value, missing or unreadable image, a path that leaves the root as
written or through a symlink) is reported with its line number and skipped: one broken crop
must not cost a 10,954-image run. A wrong header is different: it means the file is not a
FairFace label file at all, so it is an error before any request is made.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

from PIL import Image
import tqdm

from facellm_jax.input import image as image_lib

AGE_BINS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
GENDERS = ("Male", "Female")
RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian",
         "Middle Eastern")
REQUIRED_COLUMNS = ("file", "age", "gender", "race", "service_test")
_VOCAB = {"age": AGE_BINS, "gender": GENDERS, "race": RACES}


class LabelsError(ValueError):
  """The label file cannot be used at all (missing, unreadable, wrong header)."""


@dataclasses.dataclass(frozen=True)
class Face:
  line: int  # line number in the CSV (the header is line 1)
  image_id: str  # the `file` column, relative to the image root
  path: str  # absolute path of the image
  labels: dict[str, str]  # every column but `file`, e.g. age, gender, race, expression, ...


@dataclasses.dataclass(frozen=True)
class BadRow:
  line: int
  image_id: str
  reason: str

  def as_dict(self) -> dict[str, object]:
    return {"row": self.line, "file": self.image_id, "reason": self.reason}

  def skipped(self, csv_path: str) -> str:
    """The line a command prints for this row."""
    return f"skipped {csv_path} line {self.line} ({self.image_id}): {self.reason}"


def safe_relative_path(name: str) -> bool:
  """True if `name` stays inside the root it is joined to (no absolute paths, no `..`)."""
  if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in name[:2]:
    return False
  return ".." not in name.replace("\\", "/").split("/")


def image_problem(root: str, name: str, decode: bool = True) -> str | None:
  """Why image `name` (relative to `root`) may not be used, or None. Every importer and the label
  reader check image paths here: the name must stay inside the root as written and once symlinks
  are resolved (an outside file would be trained on, or uploaded to the API), and with `decode`
  the file must decode fully."""
  if not safe_relative_path(name):
    return f"file {name!r} must be a relative path inside the image root"
  path = os.path.join(root, name)
  real_root, real = os.path.realpath(root), os.path.realpath(path)
  if os.path.commonpath([real_root, real]) != real_root:
    return f"{name} resolves to {real}, outside the image root {real_root} (a symlink?)"
  return check_image(path) if decode else None


def check_image(path: str) -> str | None:
  """Returns why the image cannot be used, or None; decodes fully so truncation shows."""
  if not os.path.isfile(path):
    return "image file not found"
  try:
    with Image.open(path) as image:
      image_lib.rgb_image(image)  # the decode every later reader uses
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return f"unreadable image ({type(e).__name__}: {e})"
  return None


def read_header(csv_path: str) -> list[str]:
  """The CSV's columns, after checking the FairFace ones are there (LabelsError otherwise)."""
  if not os.path.isfile(csv_path):
    raise LabelsError(f"label CSV not found: {csv_path}")
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      header = next(csv.reader(f), [])
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise LabelsError(f"cannot read label CSV {csv_path}: {e}") from e
  header = [h.strip() for h in header]
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  duplicated = sorted({h for h in header if header.count(h) > 1})
  if missing or duplicated:
    problem = f"missing {','.join(missing)}" if missing else f"duplicated {','.join(duplicated)}"
    raise LabelsError(
        f"{csv_path}: expected a header with columns {','.join(REQUIRED_COLUMNS)} (extra columns"
        f" allowed), found {','.join(header) or 'an empty file'} ({problem})")
  return header


def read_labels(csv_path: str, image_root: str, check_images: bool = True,
                progress: bool = True) -> tuple[list[Face], list[BadRow]]:
  """Reads the label CSV; returns the usable faces in file order and the skipped rows."""
  header = read_header(csv_path)
  if not os.path.isdir(image_root):
    raise LabelsError(f"image root is not a directory: {image_root}")
  root = os.path.abspath(image_root)
  faces, bad, seen = [], [], {}
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    next(reader)
    try:
      rows = [(reader.line_num, row) for row in reader if any(v.strip() for v in row)]
    except (csv.Error, UnicodeDecodeError) as e:
      raise LabelsError(f"{csv_path}, line {reader.line_num + 1}: malformed CSV ({e})") from e
  for line, row in tqdm.tqdm(rows, desc="checking images", unit="img", disable=not progress,
                             leave=False):
    image_id = row[0].strip() if row else ""
    reason = _row_problem(row, header, seen)
    face = None
    if reason is None:
      labels = {k: v.strip() for k, v in zip(header, row) if k != "file"}
      face = Face(line, image_id, os.path.join(root, image_id), labels)
      reason = image_problem(root, image_id, decode=check_images)
    if reason is None:
      seen[image_id] = line
      faces.append(face)
    else:
      bad.append(BadRow(line, image_id, reason))
  return faces, bad


def _row_problem(row: Sequence[str], header: Sequence[str], seen: dict[str, int]) -> str | None:
  if len(row) != len(header):
    return f"expected {len(header)} fields, found {len(row)}"
  values = dict(zip(header, (v.strip() for v in row)))
  if values["file"] in seen:
    return f"duplicate of line {seen[values['file']]}"
  for column, vocab in _VOCAB.items():
    if values[column] not in vocab:
      return f"unknown {column} {values[column]!r} (expected one of {', '.join(vocab)})"
  return None
