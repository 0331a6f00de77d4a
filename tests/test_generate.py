"""`generate` end to end with the offline backend: exactly once, resumable, crash-safe."""

import csv
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import grain
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_gen import fairface, generate, inspect as inspect_cmd, prompts
from data_gen.backends.base import Result
from data_gen.backends.offline import OfflineBackend
from fake_openai import FakeOpenAI, expected_answer, key_of, mixed_faults, refused_forever

EXTRA = ("expression", "head_pose", "roll", "eyes", "eyeglasses", "facial_hair", "hair_length",
         "hair_color", "lighting", "brightness", "sharpness", "jpeg_quality", "background")
ROWS = [  # file, age, gender, race, then EXTRA
    ("val/1.jpg", "20-29", "Female", "East Asian", "happy", "left", "0", "open", "yes", "none",
     "long", "black", "even", "normal", "sharp", "high", "blue"),
    ("val/2.jpg", "3-9", "Male", "Black", "sad", "frontal", "10", "closed", "no", "none",
     "short", "brown", "left", "dim", "blurry", "low", "grey"),
    ("val/3.jpg", "more than 70", "Female", "Latino_Hispanic", "surprised", "right", "-5",
     "open", "no", "none", "short", "grey", "right", "bright", "sharp", "high", "green"),
    ("val/4.jpg", "40-49", "Male", "Middle Eastern", "angry", "frontal", "0", "open", "yes",
     "beard", "short", "black", "even", "normal", "sharp", "low", "white"),
    ("val/5.jpg", "0-2", "Female", "Southeast Asian", "neutral", "left", "3", "open", "no",
     "none", "short", "blond", "even", "normal", "sharp", "high", "red"),
    ("val/6.jpg", "50-59", "Male", "Indian", "happy", "right", "0", "open", "no", "moustache",
     "long", "red", "left", "dim", "sharp", "high", "yellow"),
]
COLORS = {row[0]: (30 + 35 * i, 220 - 30 * i, 40 + 25 * i) for i, row in enumerate(ROWS)}
KEYS = {(row[0], a) for row in ROWS for a in prompts.ATTRIBUTES}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Six distinctly coloured faces with FairFace labels plus the synthetic world's columns."""
  root = tmp_path_factory.mktemp("world")
  for name, color in COLORS.items():
    (root / "img" / "val").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 20, 3), color, np.uint8)).save(root / "img" / name, quality=95)
  with open(root / "labels.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file", "age", "gender", "race", "service_test", *EXTRA])
    for row in ROWS:
      writer.writerow([*row[:4], "True", *row[4:]])
  return root


def _args(world, out, *extra):
  return ["--labels", str(world / "labels.csv"), "--images", str(world / "img"), "--out",
          str(out), "--no-progress", *extra]


def _read(out):
  builder = tfds.builder_from_directory(str(out))
  return {split: [builder.as_data_source(split)[i] for i in range(info.num_examples)]
          for split, info in builder.info.splits.items()}


def _keyed(records):
  return sorted((r["image_id"].decode(), r["attribute"].decode(), r["answer"].decode())
                for r in records)


def _journal_rows(out):
  """Rows in OUT's journal, read without ever creating it (0 until its schema exists)."""
  path = os.path.join(out, generate.JOURNAL_FILE)
  if not os.path.exists(path):
    return 0
  db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
  try:
    return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
  except sqlite3.OperationalError:  # the schema is not written yet
    return 0
  finally:
    db.close()


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
  out = tmp_path_factory.mktemp("uninterrupted") / "out"
  assert generate.main(_args(world, out, "--val-fraction", "0.3")) == 0
  return out


def test_offline_run_writes_every_key_once_with_its_own_answer(world, uninterrupted):
  splits = _read(uninterrupted)
  records = splits["train"] + splits["validation"]
  keys = [(r["image_id"].decode(), r["attribute"].decode()) for r in records]
  assert len(keys) == len(set(keys)) == len(KEYS) and set(keys) == KEYS
  assert not ({r["image_id"] for r in splits["train"]} &
              {r["image_id"] for r in splits["validation"]})
  labels = {row[0]: dict(zip(("age", "gender", "race") + EXTRA, row[1:])) for row in ROWS}
  for r in records:
    image_id, attribute, answer = (r[k].decode() for k in ("image_id", "attribute", "answer"))
    own = labels[image_id]
    np.testing.assert_allclose(r["image"].mean(axis=(0, 1)), COLORS[image_id], atol=4)
    assert r["question"].decode() == prompts.QUESTIONS[attribute]
    assert r["source"] == b"offline" and r["race"].decode() == own["race"]
    assert answer == OfflineBackend(seed=0).answer(image_id, attribute, {**own})
    if attribute == "demographics":
      assert prompts.person_noun(own["gender"], own["age"]) in answer
      assert prompts.age_phrase(own["age"]) in answer
      assert prompts.ethnicity_phrase(own["race"]) in answer
    if attribute == "expression":
      assert re.search(rf"\b{own['expression']}\b", answer)
      assert f"eyes are {own['eyes']}" in answer
  source = tfds.builder_from_directory(str(uninterrupted)).as_data_source(split="train")
  assert len(grain.MapDataset.source(source)) == len(splits["train"])


def test_report_counts_the_run(uninterrupted):
  report = inspect_cmd.summarize(str(uninterrupted))["report"]
  assert (report["expected"], report["requested"], report["written"]) == (48, 48, 48)
  assert (report["refused"], report["failed"], report["unanswered"]) == (0, 0, 0)
  assert report["skipped_rows"] == 0 and report["bad_images"] == []
  assert sum(report["splits"].values()) == 48 and report["splits"]["validation"] % 8 == 0
  assert report["estimated_cost_usd"] == 0.0 and report["run"]["ok"] == 48


def test_rerun_requests_nothing_and_rewrites_the_same_dataset(world, tmp_path):
  out = tmp_path / "out"
  assert generate.main(_args(world, out)) == 0
  first = _keyed(_read(out)["train"])
  assert generate.main(_args(world, out)) == 0
  report = inspect_cmd.summarize(str(out))["report"]
  assert (report["requested"], report["already_done"], report["written"]) == (0, 48, 48)
  assert _keyed(_read(out)["train"]) == first
  assert len([n for n in os.listdir(out) if n.startswith("data-")]) == 1


class ScriptedBackend:
  """Refuses `pose`, fails `lighting` (10 prompt tokens each), answers the rest; logs requests."""

  name = "openai"

  def __init__(self, refuse=("pose",), fail=("lighting",)):
    self.refuse, self.fail, self.seen = refuse, fail, []

  async def run(self, requests, emit, meta, retrying=None):
    for r in requests:
      self.seen.append(r.key)
      if r.attribute in self.refuse:
        emit(Result(r.image_id, r.attribute, "refused", prompt_tokens=10, error="sorry"))
      elif r.attribute in self.fail:
        emit(Result(r.image_id, r.attribute, "failed", prompt_tokens=10, error="503"))
      else:
        emit(Result(r.image_id, r.attribute, "ok", answer=f"about {r.image_id}",
                          prompt_tokens=10, completion_tokens=5))


def _faces(world):
  return fairface.read_labels(str(world / "labels.csv"), str(world / "img"), progress=False)


def test_refused_are_final_and_failed_are_retried_on_rerun(world, tmp_path):
  faces, bad = _faces(world)
  options = generate.RunOptions(str(tmp_path / "out"), list(prompts.ATTRIBUTES), progress=False)
  first = ScriptedBackend()
  report = generate.run(faces, bad, first, options)
  assert len(first.seen) == 48
  assert (report["written"], report["refused"], report["failed"]) == (36, 6, 6)
  assert report["prompt_tokens"] == 480 and report["completion_tokens"] == 180
  attributes = {r["attribute"] for r in _read(options.out)["train"]}
  assert attributes == {a.encode() for a in prompts.ATTRIBUTES} - {b"pose", b"lighting"}

  second = ScriptedBackend(refuse=(), fail=())
  report = generate.run(faces, bad, second, options)
  assert sorted(second.seen) == sorted(k for k in KEYS if k[1] == "lighting")
  assert (report["requested"], report["written"], report["refused"], report["failed"]) == (
      6, 42, 6, 0)
  assert report["prompt_tokens"] == 480 + 60  # the failed attempts were paid for too


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(world, uninterrupted, tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data_gen", "generate",
         *_args(world, out, "--val-fraction", "0.3", "--offline-delay", "0.2",
                 "--concurrency", "2")]  # ~5 s in all: the kill lands mid-run on a loaded box
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while time.time() < deadline and proc.poll() is None:
    if _journal_rows(out) >= 8:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  done = _journal_rows(out)
  assert 8 <= done < 48
  assert not os.path.exists(out / "dataset_info.json")

  assert generate.main(_args(world, out, "--val-fraction", "0.3")) == 0
  report = inspect_cmd.summarize(str(out))["report"]
  assert (report["already_done"], report["requested"], report["written"]) == (
      done, 48 - done, 48)
  resumed, expected = _read(out), _read(uninterrupted)
  for split in ("train", "validation"):
    assert _keyed(resumed[split]) == _keyed(expected[split])


def _bad_header(world, tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("file,age,sex,race,service_test\nval/1.jpg,20-29,Female,White,True\n")
  return ["--labels", str(path)]


@pytest.mark.parametrize("case", [
    "missing csv", "wrong header", "missing image root", "no api key", "unknown attribute",
    "bad val fraction", "missing flag"])
def test_bad_input_is_a_one_line_error_and_writes_nothing(world, tmp_path, monkeypatch, capsys,
                                                         case):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  out = tmp_path / "out"
  argv = _args(world, out)
  extra = {
      "missing csv": ["--labels", str(tmp_path / "nope.csv")],
      "wrong header": _bad_header(world, tmp_path),
      "missing image root": ["--images", str(tmp_path / "nope")],
      "no api key": ["--backend", "openai"],
      "unknown attribute": ["--attributes", "pose,mood"],
      "bad val fraction": ["--val-fraction", "1.5"],
      "missing flag": [],
  }[case]
  if case == "missing flag":
    argv = argv[2:]  # drop --labels
  assert generate.main(argv + extra) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert not out.exists()


def test_out_that_is_not_ours_is_refused(world, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  assert generate.main(_args(world, out)) == 2
  assert "not a data_gen output" in capsys.readouterr().err
  assert os.listdir(out) == ["precious.txt"]


class LeakyBackend:
  name = "openai"

  def __init__(self, secret):
    self.secret = secret

  async def run(self, requests, emit, meta, retrying=None):
    for r in requests:
      emit(Result(r.image_id, r.attribute, "failed", error=f"401 bad key {self.secret}"))
    raise RuntimeError(f"auth failed for key {self.secret}")


def test_api_key_is_never_written_or_printed(world, tmp_path, monkeypatch, capsys):
  secret = "sk-test-very-secret-0123456789"
  monkeypatch.setenv("OPENAI_API_KEY", secret)
  monkeypatch.setattr(generate, "make_backend", lambda *a: LeakyBackend(secret))
  out = tmp_path / "out"
  assert generate.main(_args(world, out, "--backend", "openai", "--limit", "2")) == 1
  err = capsys.readouterr().err
  assert "RuntimeError" in err and "[redacted]" in err and secret not in err
  files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
  assert any(f.endswith("journal.sqlite") for f in files)
  for path in files:
    with open(path, "rb") as f:
      assert secret.encode() not in f.read(), path


def test_bad_rows_are_reported_and_the_run_completes(world, tmp_path):
  labels = tmp_path / "labels.csv"
  text = (world / "labels.csv").read_text()
  labels.write_text(text + "val/404.jpg,20-29,Male,White,True" + "," * len(EXTRA) + "\n"
                    "val/7.jpg,20-29,Male,Martian,True" + "," * len(EXTRA) + "\n")
  out = tmp_path / "out"
  argv = ["--labels", str(labels), "--images", str(world / "img"), "--out", str(out),
          "--no-progress", "--attributes", "demographics"]
  assert generate.main(argv) == 0
  report = inspect_cmd.summarize(str(out))["report"]
  assert report["skipped_rows"] == 2 and report["written"] == 6
  assert [(b["row"], b["file"]) for b in report["bad_images"]] == [
      (8, "val/404.jpg"), (9, "val/7.jpg")]
  assert "not found" in report["bad_images"][0]["reason"]
  assert "Martian" in report["bad_images"][1]["reason"]


def test_limit_and_attributes_select_the_work(world, tmp_path, capsys):
  out = tmp_path / "out"
  assert generate.main(_args(world, out, "--limit", "2", "--attributes", "pose,expression")) == 0
  keys = {(r["image_id"], r["attribute"]) for r in _read(out)["train"]}
  assert keys == {(f"val/{i}.jpg".encode(), a) for i in (1, 2) for a in (b"pose", b"expression")}
  capsys.readouterr()
  assert inspect_cmd.main([str(out)]) == 0
  printed = capsys.readouterr().out
  assert "train: 4 QA pairs over 2 images" in printed and "expression=2, pose=2" in printed
  assert inspect_cmd.main([str(tmp_path / "nothing")]) == 2


def test_offline_answers_state_only_labelled_facts():
  backend = OfflineBackend(seed=0)
  fairface_only = {"age": "30-39", "gender": "Female", "race": "White", "service_test": "True"}
  assert "expression cannot be determined" in backend.answer("x", "expression", fairface_only)
  assert "cannot be determined" in backend.answer("x", "lighting", fairface_only)
  assert "cannot be determined" in backend.answer("x", "pose", fairface_only)
  description = backend.answer("x", "description", fairface_only)
  assert "woman" in description and "30-39" in description and "White" in description
  for word in ("happy", "sad", "smil", "glasses", "beard", "lit ", "blurry", "hair"):
    assert word not in description
  full = {**fairface_only, "expression": "surprised", "head_pose": "right", "roll": "-12",
          "eyeglasses": "yes", "lighting": "left", "brightness": "dim", "sharpness": "blurry"}
  assert "surprised" in backend.answer("x", "expression", full)
  pose = backend.answer("x", "pose", full)
  assert "turned to the right" in pose and "about 12 degrees" in pose and "Eyeglasses" in pose
  forensic = backend.answer("x", "forensic", full)
  for clause in ("dim", "blurry", "eyeglasses", "lit from the left", "turned to the right"):
    assert clause in forensic
  answers = {OfflineBackend(seed=s).answer(f"{i}", "demographics", full)
             for s in range(3) for i in range(5)}
  assert len(answers) > 1  # several phrasings ...
  assert backend.answer("7", "lighting", full) == OfflineBackend(0).answer("7", "lighting", full)


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_openai_backends_through_a_faulty_server_store_each_answer_once(world, tmp_path,
                                                                       monkeypatch, backend):
  out = tmp_path / "out"
  with FakeOpenAI(faults=mixed_faults, latency=0.01) as fake:
    monkeypatch.setenv("OPENAI_API_KEY", fake.api_key)
    argv = _args(world, out, "--backend", backend, "--base-url", fake.base_url,
                 "--poll-interval", "0.05", "--val-fraction", "0.3")
    assert generate.main(argv) == 0
  faces, _ = _faces(world)
  requests = {r.key: r for r in generate.build_requests(faces, list(prompts.ATTRIBUTES),
                                                        prompts.PromptSet())}
  refused = {k for k, r in requests.items() if refused_forever(key_of(r))}
  assert 0 < len(refused) < len(requests)
  splits = _read(out)
  records = splits["train"] + splits["validation"]
  keys = [(r["image_id"].decode(), r["attribute"].decode()) for r in records]
  assert len(keys) == len(set(keys)) and set(keys) == set(requests) - refused
  for r, key in zip(records, keys):
    assert r["answer"].decode() == expected_answer(requests[key])
    assert r["source"].decode() == backend
  report = inspect_cmd.summarize(str(out))["report"]
  assert (report["written"], report["refused"], report["failed"]) == (
      48 - len(refused), len(refused), 0)
  assert report["prompt_tokens"] > 0 and report["estimated_cost_usd"] > 0
  for directory, _, names in os.walk(out):
    for name in names:
      with open(os.path.join(directory, name), "rb") as f:
        assert fake.api_key.encode() not in f.read()


def _edited_world(world, tmp_path, edit):
  """A copy of the world whose CSV rows are changed by `edit(row) -> row`."""
  copy = tmp_path / "world"
  shutil.copytree(world, copy)
  with open(world / "labels.csv", newline="") as f:
    rows = list(csv.reader(f))
  with open(copy / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([rows[0]] + [edit(list(r)) for r in rows[1:]])
  return copy


def _relabel_2(row):
  if row[0] == "val/2.jpg":  # was a Black boy aged 3-9
    row[2:4] = ["Female", "White"]
  return row


def test_an_answer_made_from_edited_labels_is_asked_again(world, tmp_path, capsys):
  out = tmp_path / "out"
  attributes = ["--attributes", "demographics,expression"]
  assert generate.main(_args(world, out, *attributes)) == 0
  before = {k[:2]: k[2] for k in _keyed(_read(out)["train"])}
  assert "boy" in before[("val/2.jpg", "demographics")]
  edited = _edited_world(world, tmp_path, _relabel_2)
  capsys.readouterr()
  assert generate.main(_args(edited, out, *attributes)) == 0
  assert "requested 2 (2 redone: made from other inputs)" in capsys.readouterr().err
  report = inspect_cmd.summarize(str(out))["report"]
  assert (report["requested"], report["redone"], report["already_done"]) == (2, 2, 10)
  after = {k[:2]: k[2] for k in _keyed(_read(out)["train"])}
  labels = dict(zip(("age", "gender", "race") + EXTRA, ROWS[1][1:]), gender="Female",
                race="White")
  for attribute in ("demographics", "expression"):
    assert after[("val/2.jpg", attribute)] == OfflineBackend(0).answer("val/2.jpg", attribute,
                                                                       labels)
  assert "girl" in after[("val/2.jpg", "demographics")]
  assert "White" in after[("val/2.jpg", "demographics")]
  assert {k: v for k, v in after.items() if k[0] != "val/2.jpg"} == {
      k: v for k, v in before.items() if k[0] != "val/2.jpg"}
  assert generate.main(_args(edited, out, *attributes)) == 0  # and then it is settled
  assert inspect_cmd.summarize(str(out))["report"]["requested"] == 0


def test_stale_refuse_stops_before_any_request(world, tmp_path, capsys):
  out = tmp_path / "out"
  assert generate.main(_args(world, out, "--attributes", "pose")) == 0
  first = _keyed(_read(out)["train"])
  capsys.readouterr()
  edited = _edited_world(world, tmp_path, _relabel_2)
  assert generate.main(_args(edited, out, "--attributes", "pose", "--stale", "refuse")) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "1 journaled answer(s)" in err and "val/2.jpg pose" in err
  assert "--stale redo" in err
  assert _keyed(_read(out)["train"]) == first


def test_a_stale_answer_never_reaches_the_dataset_even_when_its_redo_fails(world, tmp_path):
  out = tmp_path / "out"
  options = generate.RunOptions(str(out), ["pose"], progress=False)
  generate.run(*_faces(world), ScriptedBackend(refuse=(), fail=()), options)
  edited = _edited_world(world, tmp_path, _relabel_2)
  again = ScriptedBackend(refuse=(), fail=("pose",))
  report = generate.run(*_faces(edited), again, options)
  assert again.seen == [("val/2.jpg", "pose")]
  assert (report["written"], report["failed"], report["redone"]) == (5, 1, 1)
  assert "val/2.jpg" not in {r["image_id"].decode() for r in _read(out)["train"]}


def test_through_the_openai_server_only_changed_labels_or_images_are_asked_again(
    world, tmp_path, monkeypatch):
  out = tmp_path / "out"
  edited = _edited_world(world, tmp_path, _relabel_2)
  with FakeOpenAI() as fake:
    monkeypatch.setenv("OPENAI_API_KEY", fake.api_key)
    argv = ["--backend", "openai", "--base-url", fake.base_url, "--attributes", "pose,lighting"]
    assert generate.main(_args(world, out, *argv)) == 0
    assert len(fake.chat_calls()) == 12
    assert generate.main(_args(edited, out, *argv)) == 0
    second = fake.chat_calls()[12:]
    Image.fromarray(np.full((24, 20, 3), 7, np.uint8)).save(edited / "img" / "val" / "5.jpg")
    assert generate.main(_args(edited, out, *argv)) == 0
    third = fake.chat_calls()[12 + len(second):]
  faces, _ = _faces(edited)
  requests = {r.key: r for r in generate.build_requests(faces, ["pose", "lighting"],
                                                        prompts.PromptSet())}
  assert sorted(c.key for c in second) == sorted(
      key_of(requests[("val/2.jpg", a)]) for a in ("pose", "lighting"))
  assert sorted(c.key for c in third) == sorted(
      key_of(requests[("val/5.jpg", a)]) for a in ("pose", "lighting"))
  records = _read(out)["train"]
  assert len(records) == 12
  for r in records:
    key = (r["image_id"].decode(), r["attribute"].decode())
    assert r["answer"].decode() == expected_answer(requests[key])  # the new prompt, the new image
  report = inspect_cmd.summarize(str(out))["report"]
  assert (report["requested"], report["redone"]) == (2, 2)


def test_each_backend_fingerprints_what_its_answer_is_made_from(world):
  from data_gen.backends.openai_chat import OpenAIChatBackend  # pylint: disable=g-import-not-at-top

  faces, _ = _faces(world)
  base = generate.build_requests(faces[:1], ["pose"], prompts.PromptSet())
  other_prompt = generate.build_requests(
      faces[:1], ["pose"], prompts.PromptSet(user={**prompts.USER_PROMPTS, "pose": "Pose?"}))

  def inputs(requests, backend):
    return generate.fingerprinted(requests, backend)[0].inputs

  offline = OfflineBackend(seed=0)
  assert inputs(base, offline) == inputs(other_prompt, offline)  # offline answers ignore prompts
  assert inputs(base, offline) != inputs(base, OfflineBackend(seed=1))
  chat = OpenAIChatBackend("gpt-4o-2024-11-20", "sk-x", None, 1)
  assert inputs(base, chat) != inputs(other_prompt, chat)
  assert inputs(base, chat) != inputs(base, OpenAIChatBackend("gpt-4o-mini", "sk-x", None, 1))
  assert inputs(base, chat) == inputs(base, OpenAIChatBackend("gpt-4o-2024-11-20", "sk-y", None, 8))


def _closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]  # nothing listens once the socket is closed


def test_an_unreachable_server_shows_its_cause_as_it_happens_and_fails_the_run(
    world, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("OPENAI_API_KEY", "sk-test-unreachable-0123456789")
  out = tmp_path / "out"
  url = f"http://127.0.0.1:{_closed_port()}/v1"
  argv = [*_args(world, out, "--backend", "openai", "--base-url", url, "--attributes", "pose",
                 "--max-retries", "1")]
  argv.remove("--no-progress")  # the progress line is what a user watches
  assert generate.main(argv) == 1
  err = capsys.readouterr().err
  cause = "connection failed: ConnectionRefusedError: [Errno 111]"
  assert err.count(f"{cause}") >= 2 and "retrying" in err  # a line when it first happens ...
  assert f"last={cause}" in err and "retries=" in err  # ... and on the progress line
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: all 6 requests of this run failed, 6 with: " + cause), last
  assert "no answer was journaled" in last
  report = json.loads((out / "report.json").read_text())
  assert (report["written"], report["failed"], report["run"]["ok"]) == (0, 6, 0)
  ((reason, count),) = report["failures_by_cause"].items()
  assert reason.startswith(cause) and count == 6
  assert sum(report["run"]["retries"].values()) == 6  # one retry each, then the cause is final
  assert not (out / "dataset_info.json").exists()
  with sqlite3.connect(out / generate.JOURNAL_FILE) as db:
    assert db.execute("SELECT COUNT(*) FROM results WHERE status != 'failed'").fetchone() == (0,)


def test_an_unreachable_batch_api_is_one_line_and_journals_nothing(world, tmp_path, monkeypatch,
                                                                   capsys):
  monkeypatch.setenv("OPENAI_API_KEY", "sk-test-unreachable-0123456789")
  out = tmp_path / "out"
  url = f"http://127.0.0.1:{_closed_port()}/v1"
  assert generate.main(_args(world, out, "--backend", "openai-batch", "--base-url", url,
                             "--max-retries", "0", "--attributes", "pose")) == 1
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"error: while requesting answers: could not upload the batch input at {url}:"
                         " connection failed: ConnectionRefusedError"), line
  assert line.endswith("nothing of this run was journaled")
  assert _journal_rows(out) == 0 and not (out / "dataset_info.json").exists()


def test_a_run_with_some_failures_completes_and_names_their_cause(world, tmp_path, capsys):
  options = generate.RunOptions(str(tmp_path / "out"), ["pose", "lighting"], progress=False)
  report = generate.run(*_faces(world), ScriptedBackend(refuse=(), fail=("lighting",)), options)
  assert report["failures_by_cause"] == {"503": 6} and report["run"]["failures"] == {"503": 6}
  assert report["written"] == 6


def test_ctrl_c_says_how_much_of_the_run_is_journaled_and_the_rerun_finishes(world, tmp_path):
  out = tmp_path / "out"
  # 2 in flight x 0.2 s: ~5 s for the 48 requests, so the signal lands mid-run even on a loaded box.
  cmd = [sys.executable, "-m", "data_gen", "generate",
         *_args(world, out, "--offline-delay", "0.2", "--concurrency", "2")]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while time.time() < deadline and _journal_rows(out) < 5:
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  err = proc.communicate(timeout=60)[1]
  assert proc.returncode == 130
  (line,) = err.strip().splitlines()
  done = _journal_rows(out)
  assert line == (f"interrupted while requesting answers; {done} result(s) of this run are"
                  " journaled: rerun the same command to resume"), line
  assert generate.main(_args(world, out)) == 0
  report = inspect_cmd.summarize(str(out))["report"]
  assert (report["already_done"], report["written"]) == (done, 48)
