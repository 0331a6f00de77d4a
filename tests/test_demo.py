"""The offline demo end to end (smoke size), and the MCQ items and attribute cards it trains on."""

import collections
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from data_gen import cards, fairface, mcq, synth
from facellm_jax import demo, demo_picture
from facellm_jax.evaluation import facexbench

SEED = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Training faces and a benchmark written by the synthetic world, as the demo writes them."""
  root = tmp_path_factory.mktemp("world")
  synth.write_dataset(root / "faces", 40, SEED, size=56)
  synth.write_benchmark(root / "benchmark", 2, SEED, size=56)
  faces, bad = fairface.read_labels(str(root / "faces" / "labels.csv"), str(root / "faces"),
                                    progress=False)
  assert not bad
  return root, faces


def _truth(task, labels, answer_text):
  """The option text a face's labels make correct for this task (independent of mcq.py)."""
  if task == "age":
    return labels["age"]
  if task == "gender":
    return labels["gender"]
  if task == "race":
    return labels["race"]
  if task == "expression":
    return labels["expression"]
  if task == "headpose":
    return labels["head_pose"]
  if task == "attributes":
    if answer_text in ("Yes", "No"):
      return {"yes": "Yes", "no": "No"}[labels["eyeglasses"]]
    return {"none": "No facial hair", "beard": "Beard", "moustache": "Moustache"}[labels["facial_hair"]]
  if task == "image_quality":
    return labels["sharpness"] if answer_text in ("sharp", "blurry") else labels["jpeg_quality"]
  raise AssertionError(task)


@pytest.mark.parametrize("answer_form", mcq.ANSWER_FORMS)
def test_mcq_prompts_are_the_benchmark_prompt_and_the_target_extracts_to_the_label(world, answer_form):
  root, faces = world
  benchmark = {q.task: q for q in facexbench.load_benchmark(root / "benchmark")}
  templates = {t: set(v[3]) for t, v in synth.BENCHMARK_TASKS.items()}
  letters = collections.Counter()
  for face in faces:
    for item in mcq.face_mcqs(face.image_id, face.labels, SEED, rounds=3, answer_form=answer_form):
      ref = benchmark[synth.BENCHMARK_TASKS[item.task][1]]
      q = item.question
      assert q.question_text in templates[item.task]
      # The benchmark file's own header fields and this item's question and options, through the
      # benchmark's prompt builder, give exactly the training prompt.
      same = facexbench.Question(
          qid="x", category=ref.category, task=ref.task, dataset=ref.dataset,
          num_images=ref.num_images, image_paths=(root / "x.jpg",), question_text=q.question_text,
          options=q.options, correct=q.correct, answer=q.answer, prepend_text=ref.prepend_text,
          postpend_text=ref.postpend_text, context=None)
      assert f"{facexbench.IMAGE_MARKER}\n{item.prompt}" == facexbench.build_prompt(same)
      assert item.prompt.startswith(q.question_text + "\n" + ref.postpend_text + "\n(A) ")
      assert len(q.options) == 4 and len(set(q.options)) == 4
      truth = _truth(item.task, face.labels, q.answer)
      assert q.options[facexbench.LETTERS.index(q.correct)] == truth == q.answer
      if answer_form == "text":
        # The target names the option; the benchmark's extraction (its option-text rule, as no
        # letter pattern matches) maps it to the right letter, whatever the order and distractors.
        assert item.target == f" {q.answer}"
      else:
        # The option's text, then its letter, which the extraction's letter patterns read: the
        # same letter with the option texts hidden from it.
        assert item.target == f" {q.answer}({q.correct})"
        assert facexbench.extract_answer(item.target, ["w", "x", "y", "z"]) == q.correct
      assert facexbench.extract_answer(item.target, q.options) == q.correct
      letters[q.correct] += 1
  assert set(letters) == set(facexbench.LETTERS)  # options are shuffled
  assert max(letters.values()) < 0.4 * sum(letters.values())


def test_mcq_items_are_deterministic_and_differ_per_round(world):
  _, faces = world
  face = faces[0]
  first = mcq.face_mcqs(face.image_id, face.labels, SEED, rounds=3)
  assert first == mcq.face_mcqs(face.image_id, face.labels, SEED, rounds=3)
  assert [m.task for m in first] == list(mcq.TASKS) * 3
  assert len({m.prompt for m in first}) > len(mcq.TASKS)


def test_mcq_dataset_holds_items_beside_the_qa(world, tmp_path):
  root, faces = world
  counts = mcq.write_dataset(faces[:5], str(tmp_path / "data"), seed=SEED, rounds=2,
                             with_cards=True, progress=False)
  assert counts == {"mcq": 5 * 2 * len(mcq.TASKS), "qa": 0, "cards": 5, "pointers": 0,
                    "total": 5 * 2 * len(mcq.TASKS) + 5}
  from facellm_jax.input import pipeline

  source = pipeline.open_tfds_source(tmp_path / "data")
  assert len(source) == counts["total"]
  attributes = collections.Counter(pipeline._text(source[i]["attribute"]) for i in range(len(source)))
  assert attributes[cards.ATTRIBUTE] == 5
  assert sum(n for a, n in attributes.items() if a.startswith(mcq.ATTRIBUTE_PREFIX)) == counts["mcq"]
  assert source[0]["image"].shape == (56, 56, 3)


def test_a_card_names_every_benchmark_factor_in_the_option_words(world, tmp_path):
  root, faces = world
  for face in faces:
    text = cards.card(face.labels)
    for task in synth.BENCHMARK_TASKS:
      # Every answer an MCQ about this face can have appears in its card, verbatim.
      for item in mcq.face_mcqs(face.image_id, face.labels, SEED, tasks=[task], rounds=4):
        assert item.question.answer in text, (task, item.question.answer, text)
  labels = dict(faces[0].labels, age="20-29", gender="Female", eyeglasses="yes", facial_hair="none")
  labels |= dict(expression="happy", sharpness="sharp", jpeg_quality="low", race="Black",
                head_pose="left")
  assert cards.card(labels) == "happy sharp low 20-29 Female Black left Yes No facial hair."
  with pytest.raises(ValueError, match="synthetic world's labels"):
    cards.card({"age": "20-29", "gender": "Female", "race": "White"})
  assert cards.main(["--labels", str(root / "faces" / "labels.csv"), "--images", str(root / "faces"),
                     "--out", str(tmp_path / "cards"), "--no-progress"]) == 0
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top  (imports TFDS)

  source = pipeline.open_tfds_source(tmp_path / "cards")
  assert len(source) == len(faces)
  record = source[0]
  assert pipeline._text(record["question"]) == cards.QUESTION
  assert pipeline._text(record["answer"]) == cards.card(
      next(f.labels for f in faces if f.image_id == pipeline._text(record["image_id"])))


def test_the_letter_form_trains_letter_replies_and_the_card_stage_the_lookups(world, tmp_path):
  """`--mcq-answer text_letter`: every MCQ target is its option's text, then the right letter, and
  the card stage's data holds one letter lookup per face beside its card, none over age's lists."""
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top  (imports TFDS)

  root, faces = world
  settings = demo.Settings(mcq_answer="text_letter", seed=SEED)
  demo._generate(tmp_path, settings, faces)
  demo._items(tmp_path, settings, faces)
  labels = {f.image_id: f.labels for f in faces}
  source = pipeline.open_tfds_source(tmp_path / "data")
  mcqs = 0
  for i in range(len(source)):
    attribute, prompt, target, image_id = (pipeline._text(source[i][k])
                                           for k in ("attribute", "question", "answer", "image_id"))
    if not attribute.startswith(mcq.ATTRIBUTE_PREFIX):
      continue
    options = [line[4:] for line in prompt.splitlines() if line[:1] == "(" and line[2:4] == ") "]
    text, letter = target[1:-3], target[-2]
    assert target == f" {text}({letter})" and options["ABCD".index(letter)] == text
    assert text == _truth(attribute.removeprefix(mcq.ATTRIBUTE_PREFIX), labels[image_id], text)
    assert facexbench.extract_answer(target, options) == letter
    mcqs += 1
  assert mcqs == len(faces) * len(mcq.TASKS)
  assert set(demo.LOOKUP_TASKS) == set(mcq.TASKS) - {"age"}
  source = pipeline.open_tfds_source(tmp_path / "cards")
  kinds = collections.Counter(pipeline._text(source[i]["attribute"]) for i in range(len(source)))
  assert kinds == {cards.ATTRIBUTE: len(faces), mcq.POINTER_ATTRIBUTE: len(faces)}
  for i in range(len(source)):
    if pipeline._text(source[i]["attribute"]) == mcq.POINTER_ATTRIBUTE:
      assert not set(pipeline._text(source[i]["question"]).split()) & set(synth.AGE_BINS)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo") / "w"
  code = demo.main(["--workdir", str(workdir), "--smoke"])
  return workdir, code


def test_smoke_demo_runs_every_stage_and_writes_the_report(smoke, capsys):
  workdir, code = smoke
  assert code == 0
  report = json.loads((workdir / demo.REPORT_FILE).read_text())
  tasks = {v[1] for v in synth.BENCHMARK_TASKS.values()}
  assert set(report["per_task"]) == tasks
  assert report["chance"] == 0.25
  assert 0.0 <= report["synth_mcq_accuracy"] <= 1.0
  n = demo.SMOKE.benchmark_num * len(tasks)
  assert report["total_questions"] == n
  correct = sum(c["correct"] for c in report["per_task_counts"].values())
  assert report["synth_mcq_accuracy"] == pytest.approx(correct / n)
  assert set(report["timings"]) == {"synthesize", "generate", "items", "vision", "pretrain",
                                    "train", "evaluate", "chat", "picture", "total"}
  assert all(t["wall_s"] >= 0 and t["cpu_s"] >= 0 for t in report["timings"].values())
  assert report["train"]["steps"] == demo.SMOKE.steps
  assert report["pretrain"]["steps"] == demo.SMOKE.pretrain_steps
  assert report["vision"]["steps"] == demo.SMOKE.vision_steps
  assert isinstance(report["chat"]["answer"], str)
  assert report["chat"]["truth"]["gender"] in ("Male", "Female")
  # Every stage left its output.
  with open(workdir / "faces" / "labels.csv", newline="") as f:
    assert len(list(csv.DictReader(f))) == demo.SMOKE.faces
  qa = json.loads((workdir / "qa" / "report.json").read_text())
  assert qa["written"] == demo.SMOKE.faces * len(demo.SMOKE.qa_attributes)
  assert report["data"] == {"faces": demo.SMOKE.faces, "benchmark_questions": n,
                            "qa_pairs": qa["written"], "mcq": demo.SMOKE.faces * len(mcq.TASKS),
                            "qa": qa["written"], "cards": demo.SMOKE.faces, "pointers": 0,
                            "total": qa["written"] + demo.SMOKE.faces * (len(mcq.TASKS) + 1),
                            "vocab_size": report["data"]["vocab_size"]}
  predictions = (workdir / "eval" / "predictions.jsonl").read_text().splitlines()
  assert len(predictions) == n
  assert (workdir / "train" / "checkpoints").is_dir()
  # The card stage started from the vision stage's checkpoint, the fine-tuning from the card
  # stage's export, with the one shared tokenizer.
  pre_cfg = json.loads((workdir / "pretrain" / "config.json").read_text())
  assert pre_cfg["model"]["hf_checkpoint"] == str(workdir / "vision" / "hf")
  train_cfg = json.loads((workdir / "train" / "config.json").read_text())
  assert train_cfg["model"]["hf_checkpoint"] == str(workdir / "pretrain" / "hf")
  assert (workdir / "pretrain" / "hf" / "model.safetensors").is_file()
  assert train_cfg["tokenizer"]["path"] == str(workdir / "tokenizer")
  assert train_cfg["checkpoint"]["every_steps"] == demo.SMOKE.steps  # saved at the stage's end only


def test_the_demo_trains_answers_the_benchmark_extraction_reads(smoke):
  """Every MCQ record the fine-tuning reads is a FaceXBench prompt (it asks for the letter) whose
  target is the text of the option the face's answer is listed under, and the benchmark's
  extraction reads that option's letter from it (the letter forms measured worse:
  data_gen/mcq.py)."""
  workdir, _ = smoke
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top  (imports TFDS)

  source = pipeline.open_tfds_source(workdir / "data")
  checked = 0
  for i in range(len(source)):
    record = source[i]
    if not pipeline._text(record["attribute"]).startswith(mcq.ATTRIBUTE_PREFIX):
      continue
    prompt, target = pipeline._text(record["question"]), pipeline._text(record["answer"])
    options = [line[4:] for line in prompt.splitlines() if line[:1] == "(" and line[2:4] == ") "]
    assert len(options) == 4 and "provide only the correct option letter" in prompt
    assert target.strip() in options
    letter = facexbench.LETTERS[options.index(target.strip())]
    assert facexbench.extract_answer(target, options) == letter
    checked += 1
  assert checked == demo.SMOKE.faces * len(mcq.TASKS)


def test_the_demo_tokenizer_spends_one_token_on_each_chat_role(smoke):
  """Every row carries the template's role names: one token each, not one per few letters."""
  from facellm_jax.input import template  # pylint: disable=g-import-not-at-top
  from facellm_jax.input import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  tokenizer = tok_lib.load_tokenizer(smoke[0] / "tokenizer")
  assert [len(tokenizer.encode(role)) for role in template.ROLES] == [1] * len(template.ROLES)


def test_every_row_fits_its_stage_and_the_fine_tuning_packs_about_three_a_row(smoke):
  """The cutoffs hold every row (the pipeline would skip the rest), and the packed fine-tuning rows
  hold several items each, never more than the image slots the vision tower runs on."""
  from facellm_jax.inference import load  # pylint: disable=g-import-not-at-top
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top
  from facellm_jax.input import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  workdir = smoke[0]
  tokenizer = tok_lib.load_tokenizer(workdir / "tokenizer")
  pre = load.load_config_file(str(demo.DEFAULT_PRETRAIN_CONFIG))
  fine = load.load_config_file(str(demo.DEFAULT_CONFIG))
  kw = dict(tokenizer=tokenizer, image_size=56, num_image_tokens=1, seq_len=512)
  lengths = {}
  for data in ("cards", "data"):
    source = pipeline.open_tfds_source(workdir / data)
    lengths[data] = [len(pipeline.record_to_example(source[i], **kw)["input_ids"])
                     for i in range(len(source))]
  assert not pre.data.packing and max(lengths["cards"]) <= pre.data.cutoff_len, max(lengths["cards"])
  assert max(lengths["data"]) <= fine.data.cutoff_len
  batch = next(iter(pipeline.make_dataset(
      source, tokenizer, image_size=56, num_image_tokens=1, seq_len=fine.data.cutoff_len, batch_size=4,
      packing=True, max_images_per_row=fine.data.max_images_per_row)))
  per_row = batch["segment_ids"].max(axis=-1)
  assert per_row.mean() >= 2.5 and per_row.max() <= fine.data.max_images_per_row, per_row
  assert np.array_equal(batch["num_images"], per_row)


def test_mcq_answer_flag_reaches_the_settings():
  assert demo._parse(["--mcq-answer", "text_letter"]).settings.mcq_answer == "text_letter"
  assert demo._parse([]).settings.mcq_answer == "text"
  assert demo._parse(["--smoke"]).settings == demo.SMOKE
  with pytest.raises(SystemExit):
    demo._parse(["--mcq-answer", "letter"])


def test_the_demo_draws_its_picture(smoke):
  workdir, _ = smoke
  report = json.loads((workdir / demo.REPORT_FILE).read_text())
  assert report["picture"] == str(workdir / demo.PICTURE_FILE)
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(report["picture"]) as png:
    assert png.format == "PNG"
    # One column per task, two faces each, and the bar chart under them.
    assert png.width >= 7 * 150 and png.height >= 2 * 200 + 150, png.size
    pixels = np.asarray(png.convert("RGB"))
  assert pixels.std() > 20  # faces and bars, not a blank canvas
  questions = facexbench.load_benchmark(workdir / "benchmark")
  shown = demo_picture.pick(questions)
  assert [q.task for q in shown[:7]] == list(report["per_task"])
  assert len(shown) == 2 * 7 and len({q.qid for q in shown}) == 14


def test_rerun_resumes_without_retraining(smoke, capsys):
  workdir, _ = smoke
  metrics = (workdir / "train" / "metrics.jsonl").read_text()
  assert demo.main(["--workdir", str(workdir), "--smoke"]) == 0
  assert (workdir / "train" / "metrics.jsonl").read_text() == metrics
  assert "overall" in capsys.readouterr().out


def test_workdir_of_other_settings_is_refused(smoke, capsys):
  workdir, _ = smoke
  assert demo.main(["--workdir", str(workdir), "--smoke", "--steps", "5"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "other settings" in err and "steps=3" in err


def test_foreign_or_bad_workdir_is_refused(tmp_path, capsys):
  (tmp_path / "mine.txt").write_text("keep me")
  assert demo.main(["--workdir", str(tmp_path), "--smoke"]) == 2
  assert "not a demo workdir" in capsys.readouterr().err
  assert demo.main(["--workdir", str(tmp_path / "mine.txt"), "--smoke"]) == 2
  assert "not a folder" in capsys.readouterr().err
  assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_sigterm_in_training_saves_and_a_rerun_continues(smoke, tmp_path, capsys):
  """SIGTERM (or Ctrl-C) mid-fine-tuning: the demo exits 143 with the checkpoint saved, and the
  same command continues from it to the end, past the stages already done."""
  workdir, _ = smoke
  steps = 30  # more than the steps before the signal lands
  other = tmp_path / "w"
  fine_tuning = {"train", "eval", demo.REPORT_FILE, demo.PICTURE_FILE}  # what this test redoes
  shutil.copytree(workdir, other,
                  ignore=lambda d, names: fine_tuning & set(names) if d == str(workdir) else ())
  settings = json.loads((other / demo.SETTINGS_FILE).read_text())
  (other / demo.SETTINGS_FILE).write_text(json.dumps(dict(settings, steps=steps)))
  (other / "pretrain" / "config.json").write_text(
      (other / "pretrain" / "config.json").read_text().replace(str(workdir), str(other)))

  def terminate_after_the_first_step():
    metrics = other / "train" / "metrics.jsonl"
    while not metrics.exists() or not metrics.read_text().strip():
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=terminate_after_the_first_step, daemon=True).start()
  argv = ["--workdir", str(other), "--smoke", "--steps", str(steps)]
  assert demo.main(argv) == 128 + signal.SIGTERM
  assert "rerun the same command to resume" in capsys.readouterr().err
  saved = [int(p.name) for p in (other / "train" / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and 1 <= max(saved) < steps
  assert demo.main(argv) == 0
  lines = [json.loads(x) for x in (other / "train" / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["step"] == steps and [x["step"] for x in lines].count(steps) == 1
  assert json.loads((other / demo.REPORT_FILE).read_text())["train"]["steps"] == steps


def test_a_gs_workdir_gets_training_eval_report_and_picture_and_resumes(smoke, tmp_path):
  """`--workdir gs://...` against the GCS emulator (tests/demo_gcs_driver.py, in a network
  namespace with only loopback): the bucket gets the fine-tuning, evaluation, report and
  picture, the scratch stages (seeded from the smoke run) stay local, a rerun trains nothing,
  errors are one line."""
  from test_gcs_workdir import ROOT, _unshare_refused  # pylint: disable=g-import-not-at-top

  reason = _unshare_refused()
  if reason:
    pytest.skip(f"needs a network namespace with only loopback for the GCS emulator: {reason}")
  driver = ["unshare", "-n", sys.executable, "tests/demo_gcs_driver.py", str(tmp_path), str(smoke[0])]
  done = subprocess.run(driver,
                        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  r = json.loads((tmp_path / "results.json").read_text())
  assert r["rc"] == 0 and r["rerun_rc"] == 0 and r["rerun_trained_nothing"]
  top = {o.split("/")[0] for o in r["objects"]}
  assert top == {"train", "eval", demo.REPORT_FILE, demo.PICTURE_FILE, demo.SETTINGS_FILE}, top
  assert "train/metrics.jsonl" in r["objects"] and "eval/predictions.jsonl" in r["objects"]
  assert any(o.startswith("train/checkpoints/3/") for o in r["objects"])
  assert r["report"]["picture"] == f"gs://bkt/demo/{demo.PICTURE_FILE}"
  assert r["png_head"] == "89504e470d0a1a0a"  # the PNG signature
  assert r["scratch"].startswith(str(tmp_path / "tmp"))
  assert r["scratch_entries"] == ["benchmark", "cards", "data", "faces", "pretrain", "qa", "tokenizer",
                                  "vision"]
  assert r["bad_seed_rc"] == 2
  assert r["denied_rc"] == 2 and "permission denied" in r["denied_err"]
  assert len(r["denied_err"].splitlines()) == 1
