"""FairFace label reader: good rows kept with their extra columns, bad rows skipped by line."""

import os

import numpy as np
from PIL import Image
import pytest

from data_gen import fairface

HEADER = "file,age,gender,race,service_test,expression"


def _image(root, name, color=(200, 40, 40)):
  path = os.path.join(root, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((16, 16, 3), color, np.uint8)).save(path, quality=95)
  return path


def _csv(tmp_path, lines, header=HEADER):
  path = tmp_path / "labels.csv"
  path.write_text("\n".join([header, *lines]) + "\n")
  return str(path)


def test_reads_rows_in_order_with_extra_columns(tmp_path):
  root = str(tmp_path / "img")
  _image(root, "val/1.jpg")
  _image(root, "val/2.jpg")
  csv_path = _csv(tmp_path, ["val/1.jpg,20-29,Female,East Asian,True,happy",
                             "val/2.jpg,more than 70,Male,Latino_Hispanic,False,neutral"])
  faces, bad = fairface.read_labels(csv_path, root, progress=False)
  assert bad == []
  assert [f.image_id for f in faces] == ["val/1.jpg", "val/2.jpg"]
  assert [f.line for f in faces] == [2, 3]
  assert faces[0].labels == {"age": "20-29", "gender": "Female", "race": "East Asian",
                             "service_test": "True", "expression": "happy"}
  assert faces[1].path == os.path.join(os.path.abspath(root), "val/2.jpg")


def test_bad_rows_are_skipped_and_reported_with_line_numbers(tmp_path):
  root = str(tmp_path / "img")
  _image(root, "ok.jpg")
  truncated = _image(root, "truncated.jpg", color=(10, 200, 30))
  with open(truncated, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[: len(data) // 2])
  (tmp_path / "img" / "text.jpg").write_text("not an image")
  csv_path = _csv(tmp_path, [
      "ok.jpg,20-29,Female,White,True,happy",             # line 2: fine
      "ok.jpg,20-29,Female,White,True,happy",             # 3: duplicate of line 2
      "missing.jpg,20-29,Male,White,True,sad",            # 4: no such file
      "truncated.jpg,30-39,Male,Black,True,sad",          # 5: truncated JPEG
      "text.jpg,30-39,Male,Black,True,sad",               # 6: not an image
      "a.jpg,21-29,Male,Black,True,sad",                  # 7: unknown age bin
      "b.jpg,20-29,male,Black,True,sad",                  # 8: unknown gender spelling
      "c.jpg,20-29,Male,Asian,True,sad",                  # 9: unknown race
      "../ok.jpg,20-29,Male,Black,True,sad",              # 10: escapes the root
      "ok.jpg,20-29,Male",                                # 11: too few fields
  ])
  faces, bad = fairface.read_labels(csv_path, root, progress=False)
  assert [f.line for f in faces] == [2]
  reasons = {b.line: b.reason for b in bad}
  assert sorted(reasons) == list(range(3, 12))
  assert "duplicate of line 2" in reasons[3]
  assert "not found" in reasons[4]
  assert "unreadable" in reasons[5] and "unreadable" in reasons[6]
  assert "unknown age '21-29'" in reasons[7]
  assert "unknown gender 'male'" in reasons[8]
  assert "unknown race 'Asian'" in reasons[9]
  assert "inside the image root" in reasons[10]
  assert "expected 6 fields, found 3" in reasons[11]
  assert bad[0].as_dict() == {"row": 3, "file": "ok.jpg", "reason": "duplicate of line 2"}


@pytest.mark.parametrize("header, problem", [
    ("file,age,gender,ethnicity,service_test", "missing race"),
    ("image,age,gender,race", "missing file,service_test"),
    ("file,age,gender,race,service_test,age", "duplicated age"),
])
def test_wrong_header_is_a_clear_error(tmp_path, header, problem):
  (tmp_path / "img").mkdir()
  csv_path = _csv(tmp_path, ["a.jpg,20-29,Male,White,True"], header=header)
  with pytest.raises(fairface.LabelsError, match=problem) as e:
    fairface.read_labels(csv_path, str(tmp_path / "img"), progress=False)
  assert "file,age,gender,race,service_test" in str(e.value)


def test_missing_csv_and_missing_root_are_errors(tmp_path):
  with pytest.raises(fairface.LabelsError, match="label CSV not found"):
    fairface.read_labels(str(tmp_path / "nope.csv"), str(tmp_path), progress=False)
  csv_path = _csv(tmp_path, [])
  with pytest.raises(fairface.LabelsError, match="image root is not a directory"):
    fairface.read_labels(csv_path, str(tmp_path / "nope"), progress=False)


@pytest.mark.parametrize("name, ok", [
    ("val/1.jpg", True), ("a..b.jpg", True), ("../x.jpg", False), ("val/../../x.jpg", False),
    ("/etc/passwd", False), ("", False), ("C:\\x.jpg", False), ("..\\x.jpg", False)])
def test_safe_relative_path(name, ok):
  assert fairface.safe_relative_path(name) is ok


def test_a_symlink_that_leads_outside_the_image_root_is_a_bad_row(tmp_path):
  root = tmp_path / "img"
  _image(str(root), "inside.jpg")
  _image(str(tmp_path / "private"), "secret.jpg")
  (root / "escape.jpg").symlink_to(tmp_path / "private" / "secret.jpg")
  (root / "sub").symlink_to(tmp_path / "private", target_is_directory=True)
  (root / "alias.jpg").symlink_to(root / "inside.jpg")  # stays inside: fine
  csv_path = _csv(tmp_path, [
      "inside.jpg,20-29,Female,White,True,happy",
      "escape.jpg,20-29,Female,White,True,happy",
      "sub/secret.jpg,20-29,Female,White,True,happy",
      "alias.jpg,20-29,Female,White,True,happy",
  ])
  for check_images in (True, False):
    faces, bad = fairface.read_labels(csv_path, str(root), check_images=check_images,
                                      progress=False)
    assert [f.image_id for f in faces] == ["inside.jpg", "alias.jpg"]
    assert [(b.line, b.image_id) for b in bad] == [(3, "escape.jpg"), (4, "sub/secret.jpg")]
    assert all("outside the image root" in b.reason and "secret.jpg" in b.reason for b in bad)


def test_an_image_root_that_is_itself_a_symlink_is_fine(tmp_path):
  _image(str(tmp_path / "real"), "a.jpg")
  (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
  assert fairface.image_problem(str(tmp_path / "link"), "a.jpg") is None
  assert "must be a relative path" in fairface.image_problem(str(tmp_path / "link"), "../a.jpg")
