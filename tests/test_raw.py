"""import-raw: the reference generator's question_<i>.txt / answer_<i>.txt folders become our
dataset, with labels from the CSV and every bad or missing file reported once, by path."""

import json

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_gen import prompts, raw

# fairfacegpt.py's attribute names, in its order; question i is built from name i (7: "detail").
REFERENCE_NAMES = ("demographic attributes", "facial structure", "skin texture",
                   "expression and emotion", "lighting and image quality", "face pose",
                   "forensic considerations", "detail")


def reference_question(i):
  name = REFERENCE_NAMES[i]
  if name == "detail":
    return "Describe this image."
  return f"Describe the {name} of the image based on the visual information."


def write_folder(root, folder, indices=range(8), skip=()):
  """The two files per index exactly as fairfacegpt.py writes them (no trailing newline)."""
  directory = root / folder
  directory.mkdir(parents=True, exist_ok=True)
  for i in indices:
    if ("question", i) not in skip:
      (directory / f"question_{i}.txt").write_text(reference_question(i) if i < 8 else "?")
    if ("answer", i) not in skip:
      (directory / f"answer_{i}.txt").write_text(f"Answer {i} about {folder}.")
  return directory


@pytest.fixture
def layout(tmp_path):
  images = tmp_path / "fairface_img_margin025"
  for n in (1, 2, 3, 5, 6):
    (images / "val").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), 40 * n, np.uint8)).save(images / "val" / f"{n}.jpg")
  (tmp_path / "elsewhere.jpg").write_bytes((images / "val" / "1.jpg").read_bytes())
  (images / "val" / "4.jpg").symlink_to(tmp_path / "elsewhere.jpg")
  (tmp_path / "labels.csv").write_text(
      "file,age,gender,race,service_test\n"
      "val/1.jpg,20-29,Female,East Asian,True\n"
      "val/2.jpg,3-9,Male,Black,False\n"
      "val/3.jpg,more than 70,Female,Indian,True\n"
      "val/4.jpg,30-39,Male,White,True\n"
      "val/5.jpg,40-49,Female,White,True\n"       # generated nothing
      "val/6.jpg,40-49,Female,Martian,True\n"     # line 7: unknown race
      "val/7.jpg,50-59,Male,White,True\n")        # no image file
  out = tmp_path / "ChatGPT" / "gpt-4o-2024-11-20"
  write_folder(out, "val/1")
  (out / "val" / "1" / "notes.txt").write_text("not the reference's")
  write_folder(out, "val/2", skip={("answer", 3), ("question", 5)})
  three = write_folder(out, "val/3", indices=range(9))
  (three / "answer_1.txt").write_text("  \n")
  (three / "question_2.txt").write_text("What colour is the sky?")
  (three / "answer_4.txt").write_bytes(b"caf\xe9")
  write_folder(out, "val/4")
  write_folder(out, "val/6")
  write_folder(out, "val/7")
  write_folder(out, "val/9", indices=[0])
  return tmp_path, images, out


def _argv(layout, out, *extra):
  root, images, raw_dir = layout
  return [str(raw_dir), "--images", str(images), "--labels", str(root / "labels.csv"), "--out",
          str(out), "--no-progress", *extra]


def test_every_good_pair_is_imported_with_its_attribute_and_labels(layout, tmp_path):
  out = tmp_path / "out"
  assert raw.main(_argv(layout, out)) == 0
  source = tfds.builder_from_directory(str(out)).as_data_source(split="train")
  records = [source[i] for i in range(len(source))]
  got = {(r["image_id"].decode(), r["attribute"].decode()): r for r in records}
  expected_indices = {"val/1.jpg": range(8), "val/2.jpg": (0, 1, 2, 4, 6, 7),
                      "val/3.jpg": (0, 3, 5, 6, 7)}
  assert sorted(got) == sorted((image, raw.REFERENCE_ATTRIBUTES[i])
                               for image, indices in expected_indices.items() for i in indices)
  for (image, attribute), r in got.items():
    i = raw.REFERENCE_ATTRIBUTES.index(attribute)
    assert r["answer"].decode() == f"Answer {i} about {image.split('.')[0]}."
    assert r["question"].decode() == prompts.QUESTIONS[attribute] == reference_question(i)
    assert r["source"] == b"fairfacegpt-raw"
  two = got[("val/2.jpg", "demographics")]
  assert (two["age"], two["gender"], two["race"]) == (b"3-9", b"Male", b"Black")
  assert got[("val/3.jpg", "description")]["age"] == b"more than 70"
  assert raw.REFERENCE_ATTRIBUTES == tuple(prompts.ATTRIBUTES)


def test_bad_and_missing_files_are_each_reported_once_by_path(layout, tmp_path, capsys):
  root, images, raw_dir = layout
  out = tmp_path / "out"
  assert raw.main(_argv(layout, out)) == 0
  report = json.loads((out / "report.json").read_text())
  problems = {p["path"]: p["reason"] for p in report["problems"]}
  assert len(problems) == len(report["problems"])  # each path once
  expected = {
      raw_dir / "val/2/answer_3.txt": "missing (its partner question_3.txt is there)",
      raw_dir / "val/2/question_5.txt": "missing (its partner answer_5.txt is there)",
      raw_dir / "val/3/answer_1.txt": "empty answer",
      raw_dir / "val/3/question_2.txt": "not the reference's question 2",
      raw_dir / "val/3/answer_4.txt": "unreadable (UnicodeDecodeError",
      raw_dir / "val/3/question_8.txt": "index 8 is not one of the reference's attributes 0-7",
      raw_dir / "val/3/answer_8.txt": "index 8 is not one of the reference's attributes 0-7",
      raw_dir / "val/4": "its label CSV row (line 5) is unusable: val/4.jpg resolves to",
      raw_dir / "val/6": "its label CSV row (line 7) is unusable: unknown race 'Martian'",
      raw_dir / "val/9": "no row of the label CSV has a `file` val/9.<ext>",
      images / "val/7.jpg": "image file not found (its answers are in",
  }
  assert sorted(problems) == sorted(str(p) for p in expected)
  for path, reason in expected.items():
    assert reason in problems[str(path)], (path, problems[str(path)])
  assert (report["written"], report["skipped_files"], report["skipped_images"]) == (19, 10, 1)
  assert report["rows_without_folder"] == 1  # val/5: the reference never got to it
  printed = [l for l in capsys.readouterr().err.splitlines() if l.startswith("skipped ")]
  assert len(printed) == len(expected)


def test_a_folder_without_any_pair_is_an_error_and_writes_nothing(layout, tmp_path, capsys):
  root, images, _ = layout
  empty = tmp_path / "nothing"
  empty.mkdir()
  out = tmp_path / "out"
  assert raw.main([str(empty), "--images", str(images), "--labels", str(root / "labels.csv"),
                   "--out", str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no question_<i>.txt/answer_<i>.txt pairs" in err
  assert not out.exists()


def test_the_module_entry_point_lists_and_runs_import_raw(layout, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "data_gen", "import-raw", *_argv(layout, out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("wrote 19 QA pairs")
