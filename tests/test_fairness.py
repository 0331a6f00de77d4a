"""Fairness report: per-group accuracy, best-worst gaps, the plot, and the predictions join."""

import json

import pytest
from PIL import Image

from facellm_jax.evaluation import fairness


def _r(task, ok, race, gender, age):
  return {"task": task, "is_correct": ok, "race": race, "gender": gender, "age": age}


RECORDS = [
    _r("age", True, "White", "Male", "20-29"),
    _r("age", True, "White", "Female", "20-29"),
    _r("age", True, "White", "Male", "30-39"),
    _r("age", False, "White", "Female", "30-39"),
    _r("age", True, "Black", "Male", "20-29"),
    _r("age", False, "Black", "Female", "30-39"),
    _r("age", False, "Indian", "Female", "20-29"),
    _r("gender", True, "White", "Male", "20-29"),
    _r("gender", True, "Black", "Female", "20-29"),
    _r("gender", False, "Black", "Male", "30-39"),
    _r("gender", True, None, "Female", "3-9"),  # no race label: left out of by_race only
]


@pytest.fixture(scope="module")
def report_and_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("fairness")
  return fairness.fairness_report(RECORDS, out), out


def _accuracies(result):
  return {g: (v["correct"], v["total"]) for g, v in result["groups"].items()}


def test_age_answers_per_race_gender_and_age_bin(report_and_dir):
  age = report_and_dir[0]["tasks"]["age"]
  assert (age["correct"], age["total"]) == (4, 7)
  assert _accuracies(age["by_race"]) == {"White": (3, 4), "Black": (1, 2), "Indian": (0, 1)}
  assert (age["by_race"]["best"], age["by_race"]["worst"]) == ("White", "Indian")
  assert age["by_race"]["gap"] == pytest.approx(0.75)
  assert _accuracies(age["by_gender"]) == {"Male": (3, 3), "Female": (1, 4)}
  assert age["by_gender"]["gap"] == pytest.approx(1.0 - 0.25)
  assert _accuracies(age["by_age"]) == {"20-29": (3, 4), "30-39": (1, 3)}
  assert age["by_age"]["gap"] == pytest.approx(0.75 - 1 / 3)


def test_missing_label_skips_only_that_grouping(report_and_dir):
  gender = report_and_dir[0]["tasks"]["gender"]
  assert gender["total"] == 4
  assert _accuracies(gender["by_race"]) == {"White": (1, 1), "Black": (1, 2)}
  assert _accuracies(gender["by_gender"]) == {"Male": (1, 2), "Female": (2, 2)}
  # Age bins in FairFace's order, not in order of appearance.
  assert list(gender["by_age"]["groups"]) == ["3-9", "20-29", "30-39"]


def test_json_and_png_are_written(report_and_dir):
  report, out = report_and_dir
  assert json.loads((out / "fairness.json").read_text()) == report
  with Image.open(out / "fairness.png") as png:
    assert png.format == "PNG"
    assert png.width > 1000 and png.height > 400  # 2 task rows x 3 grouping columns


def test_small_groups_are_left_out_of_the_gap(tmp_path):
  report = fairness.fairness_report(RECORDS, tmp_path, min_group_size=2)
  by_race = report["tasks"]["age"]["by_race"]
  assert "Indian" in by_race["groups"]
  assert (by_race["best"], by_race["worst"]) == ("White", "Black")
  assert by_race["gap"] == pytest.approx(0.25)
  # Only Black has two gender-task records: no gap with a single group.
  assert report["tasks"]["gender"]["by_race"]["gap"] is None


def test_bad_records_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="no records"):
    fairness.fairness_report([], tmp_path)
  with pytest.raises(ValueError, match="record 1: expected a 'task' string and an 'is_correct'"):
    fairness.fairness_report([RECORDS[0], {"task": "age", "race": "White"}], tmp_path)


def test_records_from_predictions_joins_labels_by_qid(tmp_path):
  lines = [
      {"qid": "ff_age/1", "task": "age", "is_correct": True},
      {"qid": "ff_age/2", "task": "age", "is_correct": False},
      {"qid": "ff_multi/1", "task": "age", "is_correct": True},  # several faces: no labels
      {"qid": "celeba/1", "task": "attributes", "is_correct": True},  # not a bias task
  ]
  path = tmp_path / "predictions.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  labels = {"ff_age/1": {"race": "Indian", "gender": "Male", "age": "3-9"},
            "ff_age/2": {"race": "White", "gender": "Female"},
            "celeba/1": {"race": "White", "gender": "Female", "age": "20-29"}}
  records = fairness.records_from_predictions(path, labels)
  assert records == [
      {"qid": "ff_age/1", "task": "age", "is_correct": True, "race": "Indian",
       "gender": "Male", "age": "3-9"},
      {"qid": "ff_age/2", "task": "age", "is_correct": False, "race": "White",
       "gender": "Female", "age": None},
  ]
  report = fairness.fairness_report(records, tmp_path)
  assert report["tasks"]["age"]["by_race"]["gap"] == pytest.approx(1.0)
  assert _accuracies(report["tasks"]["age"]["by_age"]) == {"3-9": (1, 1)}
  with pytest.raises(FileNotFoundError, match="run the FaceXBench evaluation first"):
    fairness.records_from_predictions(tmp_path / "nope.jsonl", labels)
