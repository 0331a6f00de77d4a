"""import-sharegpt: the published FairFaceGPT JSON becomes the same TFDS dataset."""

import json

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_gen import prompts, sharegpt

COLORS = {"val/1.jpg": (200, 30, 30), "val/2.jpg": (30, 200, 30), "val/3.jpg": (30, 30, 200)}


def _turns(*pairs):
  out = []
  for question, answer in pairs:
    out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
  return out


@pytest.fixture
def fairface(tmp_path):
  for name, color in COLORS.items():
    (tmp_path / "img" / "val").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 14, 3), color, np.uint8)).save(tmp_path / "img" / name)
  (tmp_path / "labels.csv").write_text(
      "file,age,gender,race,service_test\n"
      "val/1.jpg,20-29,Female,East Asian,True\n"
      "val/2.jpg,3-9,Male,Black,False\n")
  entries = [
      {"image": "val/1.jpg", "conversations": _turns(
          ("<image>\n" + prompts.QUESTIONS["pose"], "Frontal."))},
      {"image": "val/1.jpg", "conversations": _turns(
          ("<image>" + prompts.QUESTIONS["description"], "A young woman."),
          ("And her hair?", "Long and black."))},
      {"image": "val/2.jpg", "conversations": _turns(
          ("<image>" + prompts.QUESTIONS["demographics"], "A boy of about 5."))},
      {"image": "val/2.jpg", "conversations": _turns(
          ("<image>" + prompts.QUESTIONS["demographics"], "Duplicate answer."))},
      {"image": "val/3.jpg", "conversations": _turns(
          ("<image>" + prompts.QUESTIONS["lighting"], "Even light."))},
      {"image": "val/404.jpg", "conversations": _turns(
          ("<image>" + prompts.QUESTIONS["pose"], "Left."))},
  ]
  (tmp_path / "dataset.json").write_text(json.dumps(entries))
  return tmp_path


def _argv(root, out, *extra):
  return [str(root / "dataset.json"), "--images", str(root / "img"), "--out", str(out),
          "--no-progress", *extra]


def test_import_maps_questions_fills_labels_and_reads_back(fairface, tmp_path):
  out = tmp_path / "out"
  assert sharegpt.main(_argv(fairface, out, "--labels", str(fairface / "labels.csv"))) == 0
  source = tfds.builder_from_directory(str(out)).as_data_source(split="train")
  records = [source[i] for i in range(len(source))]
  got = [(r["image_id"].decode(), r["attribute"].decode(), r["answer"].decode())
         for r in records]
  assert got == [("val/1.jpg", "pose", "Frontal."),
                 ("val/1.jpg", "description", "A young woman."),
                 ("val/1.jpg", "other", "Long and black."),
                 ("val/2.jpg", "demographics", "A boy of about 5."),
                 ("val/3.jpg", "lighting", "Even light.")]
  assert records[2]["question"] == b"And her hair?"
  assert records[1]["question"] == prompts.QUESTIONS["description"].encode()
  assert (records[3]["age"], records[3]["gender"], records[3]["race"]) == (
      b"3-9", b"Male", b"Black")
  assert records[4]["age"] == b""  # not in the label CSV
  for r in records:
    np.testing.assert_allclose(r["image"].mean(axis=(0, 1)), COLORS[r["image_id"].decode()],
                               atol=4)
    assert r["source"] == b"sharegpt"
  report = json.loads((out / "report.json").read_text())
  assert (report["pairs"], report["written"], report["duplicates"]) == (7, 5, 1)
  assert report["unmatched_questions"] == 1 and report["skipped_images"] == 1
  assert report["bad_images"][0]["where"] == "entry 5" and report["bad_images"][0]["file"] == (
      "val/404.jpg")


def test_import_without_labels_leaves_them_empty(fairface, tmp_path):
  out = tmp_path / "out"
  assert sharegpt.main(_argv(fairface, out, "--val-fraction", "0.5")) == 0
  builder = tfds.builder_from_directory(str(out))
  assert set(builder.info.splits) == {"train", "validation"}
  records = [s[i] for s in (builder.as_data_source(split) for split in builder.info.splits)
             for i in range(len(s))]
  assert len(records) == 5 and {r["gender"] for r in records} == {b""}


@pytest.mark.parametrize("image", ["../secret.jpg", "/etc/passwd", "val/../../secret.jpg"])
def test_path_escaping_entry_is_rejected_and_nothing_written(fairface, tmp_path, capsys, image):
  entries = json.loads((fairface / "dataset.json").read_text())
  entries.append({"image": image, "conversations": _turns(("<image>Hi", "Hello"))})
  (fairface / "dataset.json").write_text(json.dumps(entries))
  out = tmp_path / "out"
  assert sharegpt.main(_argv(fairface, out)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "entry 6" in err
  assert "escapes the image root" in err
  assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ('{"image": "a.jpg"}', "JSON list"),
    ('[{"image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}]}]', "alternating"),
    ('[{"conversations": []}]', "one image path"),
    ('[{"image": "a.jpg", "images": ["a.jpg"], "conversations": []}]', "both `image` and `images`"),
    ('[{"images": ["a.jpg", "b.jpg"], "conversations": []}]', "one image path"),
    ('[{"image": "a.jpg", "conversations": [], "messages": []}]', "found both"),
    ('[{"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, '
     '{"from": "observation", "value": "x"}]}]', "alternating"),
    ('[{"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, '
     '{"from": "gpt", "value": "a"}, {"from": "system", "value": "late"}, '
     '{"from": "gpt", "value": "b"}]}]', "alternating"),
    ('[{"image": "a.jpg", "conversations": [{"from": "human", "value": 3}]}]', "{role, content}"),
    ('[{"image": "a.jpg", "system": 3, "conversations": []}]', "`system` must be a string"),
    ("[]", "no question/answer pairs"),
    ("not json", "cannot read"),
])
def test_malformed_file_is_a_one_line_error(tmp_path, capsys, content, message):
  (tmp_path / "img").mkdir()
  (tmp_path / "dataset.json").write_text(content)
  assert sharegpt.main(_argv(tmp_path, tmp_path / "out")) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_an_entry_whose_image_is_a_symlink_out_of_the_root_is_skipped(fairface, tmp_path):
  (tmp_path / "private").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "private" / "secret.png")
  (fairface / "img" / "val" / "5.jpg").symlink_to(tmp_path / "private" / "secret.png")
  entries = json.loads((fairface / "dataset.json").read_text())
  entries.append({"image": "val/5.jpg", "conversations": _turns(("<image>Hi", "Hello"))})
  (fairface / "dataset.json").write_text(json.dumps(entries))
  out = tmp_path / "out"
  assert sharegpt.main(_argv(fairface, out)) == 0
  report = json.loads((out / "report.json").read_text())
  bad = {b["file"]: b["reason"] for b in report["bad_images"]}
  assert "outside the image root" in bad["val/5.jpg"] and report["written"] == 5


def test_llama_factory_variants_import_alike(fairface, tmp_path, capsys):
  """The OpenAI-style `messages` with a system turn and an `images` list, and the reference's
  own tags (`from` human / assistant, as its dataset_info.json declares) with a `system` column
  and two question turns, give the same records as the plain ShareGPT file."""
  question = "<image>\n" + prompts.QUESTIONS["pose"]
  entries = [
      {"messages": [{"role": "system", "content": "You are a face expert."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": "Frontal."}],
       "images": ["val/1.jpg"]},
      {"conversations": [{"from": "human", "value": "<image>" + prompts.QUESTIONS["lighting"]},
                         {"from": "assistant", "value": "Even light."},
                         {"from": "human", "value": prompts.QUESTIONS["expression"]},
                         {"from": "assistant", "value": "A smile."}],
       "system": "You are a face expert.", "image": "val/2.jpg"},
  ]
  (tmp_path / "variants.json").write_text(json.dumps(entries))
  out = tmp_path / "out"
  assert sharegpt.main([str(tmp_path / "variants.json"), "--images", str(fairface / "img"),
                        "--out", str(out), "--no-progress"]) == 0
  assert "note: 3 pairs came with a system prompt" in capsys.readouterr().err
  source = tfds.builder_from_directory(str(out)).as_data_source(split="train")
  got = sorted((r["image_id"].decode(), r["attribute"].decode(), r["question"].decode(),
                r["answer"].decode()) for r in (source[i] for i in range(len(source))))
  assert got == [("val/1.jpg", "pose", prompts.QUESTIONS["pose"], "Frontal."),
                 ("val/2.jpg", "expression", prompts.QUESTIONS["expression"], "A smile."),
                 ("val/2.jpg", "lighting", prompts.QUESTIONS["lighting"], "Even light.")]
  report = json.loads((out / "report.json").read_text())
  assert report["system_prompts"] == {"You are a face expert.": 3}


def test_a_file_whose_every_image_is_unusable_writes_nothing(fairface, tmp_path, capsys):
  entries = [{"image": "val/404.jpg", "conversations": _turns(("<image>Hi", "Hello"))}]
  (tmp_path / "gone.json").write_text(json.dumps(entries))
  out = tmp_path / "out"
  assert sharegpt.main([str(tmp_path / "gone.json"), "--images", str(fairface / "img"), "--out",
                        str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "nothing to import" in err and "val/404.jpg" in err
  assert not out.exists()
