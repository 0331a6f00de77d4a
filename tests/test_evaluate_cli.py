"""`python -m facellm_jax.evaluate` on a small FaceXBench-format folder, with the tiny trained LoRA run."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from facellm_jax import evaluate as evaluate_cli
from facellm_jax.evaluation import facexbench
from facellm_jax.inference import answer, load
from facellm_jax.inference.generate import Generator
from facellm_jax.input import image as image_lib
from facellm_jax.input import template
from tiny_runs import face_png

NEW_TOKENS = 4


def write_benchmark(root: pathlib.Path) -> pathlib.Path:
  """Three single-image age questions and two two-image face-recognition questions."""
  single = {"category": "bias_fairness", "sub-category": "age", "dataset": "tiny", "question_type": "MCQ",
            "num_images": "single", "prepend_text": "Estimate ages.",
            "postpend_text": "Please answer with the option letter.", "questions": {}}
  for i in range(3):
    face_png(root / f"images/age/{i}.png", i)
    single["questions"][str(i)] = {
        "image_paths": [f"images/age/{i}.png"], "question_text": "How old is this person?",
        "options": ["0-2", "20-29", "40-49", "more than 70"], "correct_answer_option": "ABC"[i]}
  multiple = {"category": "face_recognition", "sub-category": "hr_fr", "dataset": "tiny", "question_type": "MCQ",
              "num_images": "multiple", "prepend_text": "", "postpend_text": "Answer with the letter.",
              "questions": {}}
  for i in range(2):
    paths = [f"images/fr/{i}_{j}.png" for j in range(2)]
    for j, p in enumerate(paths):
      face_png(root / p, 10 + 2 * i + j)
    multiple["questions"][str(i)] = {"image_paths": paths, "question_text": "Are these the same person?",
                                     "options": ["Yes", "No"], "correct_answer_option": "AB"[i]}
  (root / "tiny_single_mcq_age.json").write_text(json.dumps(single))
  (root / "tiny_multiple_mcq_hr_fr.json").write_text(json.dumps(multiple))
  return root


def _argv(workdir, bench, out, *extra):
  return ["--workdir", str(workdir), "--facexbench", str(bench), "--out", str(out), "--batch_size", "2",
          "--max_new_tokens", str(NEW_TOKENS), *extra]


@pytest.fixture(scope="module")
def workdir(lora_workdir):
  return lora_workdir


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  return write_benchmark(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def evaluated(workdir, bench, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval") / "tiny.json"
  assert evaluate_cli.main(_argv(workdir, bench, out)) == 0
  return out


@pytest.fixture(scope="module")
def loaded(workdir):
  return load.load_for_inference(workdir)


def _predictions(out):
  return [json.loads(line) for line in (out.parent / "predictions.jsonl").read_text().splitlines()]


def test_report_has_the_contract_fields_and_counts(evaluated, bench):
  report = json.loads(evaluated.read_text())
  assert {"total_questions", "overall", "per_category", "per_task", "unanswered"} <= set(report)
  assert report["total_questions"] == 5
  assert {t: r["total"] for t, r in report["per_task"].items()} == {"age": 3, "hr_fr": 2}
  assert {c: r["total"] for c, r in report["per_category"].items()} == {"bias_fairness": 3, "face_recognition": 2}
  assert {k: r["total"] for k, r in report["single_vs_multiple"].items()} == {"single": 3, "multiple": 2}
  assert report["model"]["step"] == 3 and report["max_new_tokens"] == NEW_TOKENS
  assert not (evaluated.parent / "report.json").exists()  # --out is the report, no second copy
  questions = {q.qid: q for q in facexbench.load_benchmark(bench)}
  records = _predictions(evaluated)
  assert sorted(r["qid"] for r in records) == sorted(questions)
  extracted = {r["qid"]: facexbench.extract_answer(r["prediction"], questions[r["qid"]].options) for r in records}
  hits = {qid: e == questions[qid].correct for qid, e in extracted.items()}
  assert report["correct"] == sum(hits.values())
  assert report["unanswered"] == sum(e is None for e in extracted.values())
  assert report["overall"] == pytest.approx(sum(hits.values()) / 5)
  assert report["per_task"]["hr_fr"]["correct"] == sum(v for k, v in hits.items() if "hr_fr" in k)


def test_predictions_are_the_models_answers_to_the_benchmark_prompt(evaluated, bench, loaded):
  model, config, tokenizer = loaded
  records = {r["qid"]: r["prediction"] for r in _predictions(evaluated)}
  for q in facexbench.load_benchmark(bench)[2:4]:  # a single-image and a two-image question
    expected = answer.answer(model, config, tokenizer, facexbench.build_prompt(q), q.image_paths,
                             max_new_tokens=NEW_TOKENS)
    assert records[q.qid] == expected.strip()


def test_rerun_skips_answered_questions_and_answers_the_rest(evaluated, workdir, bench, tmp_path):
  out = tmp_path / "tiny.json"
  for name in ("predictions.jsonl", "evaluation_run.json"):
    shutil.copy(evaluated.parent / name, tmp_path / name)
  lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
  first = json.loads(lines[0])
  first["prediction"] = "marker that only a skipped question keeps"
  (tmp_path / "predictions.jsonl").write_text("\n".join([json.dumps(first), *lines[1:3]]) + "\n")
  assert evaluate_cli.main(_argv(workdir, bench, out)) == 0
  after = _predictions(out)
  assert len(after) == 5 and after[0] == first  # kept, not asked again
  assert {r["qid"]: r["prediction"] for r in after[1:]} == {
      json.loads(line)["qid"]: json.loads(line)["prediction"] for line in lines[1:]}
  assert json.loads(out.read_text())["total_questions"] == 5


def test_rerun_with_other_settings_refuses_to_mix_predictions(evaluated, workdir, bench, capsys):
  argv = _argv(workdir, bench, evaluated)
  argv[argv.index("--max_new_tokens") + 1] = "5"
  assert evaluate_cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "another evaluation" in err and "max_new_tokens" in err


def test_make_generate_fn_equals_generator_run_by_hand(loaded, bench):
  model, config, tokenizer = loaded
  questions = facexbench.load_benchmark(bench)
  prompts = [facexbench.EvalPrompt(q.qid, facexbench.build_prompt(q), q.image_paths) for q in questions]
  fn = answer.make_generate_fn(model, config, tokenizer, max_new_tokens=6, batch_size=2)
  got = fn(prompts)  # chunks of 2, the last one padded

  ids, pixels = [], []
  for p in prompts:
    ids.append(template.render_prompt([{"role": "user", "content": p.text}], tokenizer,
                                      config.image_seq_length).tolist())
    pixels += [image_lib.preprocess(image_lib.load_image(path), config.vision.image_size) for path in p.image_paths]
  eos = (tokenizer.pad_id, tokenizer.im_end_id)
  tokens = Generator(model, max_new_tokens=6, eos_ids=eos, pad_id=tokenizer.pad_id)(ids, np.concatenate(pixels))
  assert got == [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
  assert any(got)


def _one_line_error(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


def test_folder_without_json_is_a_one_line_error(workdir, tmp_path, capsys):
  (tmp_path / "bench").mkdir()
  assert evaluate_cli.main(_argv(workdir, tmp_path / "bench", tmp_path / "r.json")) == 2
  assert "No FaceXBench *.json files" in _one_line_error(capsys)


def test_missing_image_is_a_one_line_error(workdir, tmp_path, capsys):
  bench = write_benchmark(tmp_path / "bench")
  (bench / "images/fr/1_1.png").unlink()
  assert evaluate_cli.main(_argv(workdir, bench, tmp_path / "r.json")) == 2
  err = _one_line_error(capsys)
  assert "images/fr/1_1.png" in err and "not found" in err
  assert not (tmp_path / "predictions.jsonl").exists()


def test_workdir_without_checkpoint_is_a_one_line_error(bench, tmp_path, capsys):
  (tmp_path / "run").mkdir()
  assert evaluate_cli.main(_argv(tmp_path / "run", bench, tmp_path / "r.json")) == 2
  assert "no complete checkpoint" in _one_line_error(capsys)


def test_fairness_labels_give_per_group_accuracy(evaluated, workdir, bench):
  labels = bench / "labels.csv"
  labels.write_text("file,age,gender,race\nimages/age/0.png,0-2,Female,Indian\n"
                    "images/age/1.png,20-29,Male,White\nimages/age/2.png,40-49,Female,White\n")
  out = evaluated.parent / "tiny.json"
  assert evaluate_cli.main(_argv(workdir, bench, out, "--fairness_labels", str(labels))) == 0
  report = json.loads(out.read_text())
  age = report["fairness"]["tasks"]["age"]
  assert age["total"] == 3  # the two-image questions have no single face
  assert {g: r["total"] for g, r in age["by_race"]["groups"].items()} == {"White": 2, "Indian": 1}
  assert age["correct"] == report["per_task"]["age"]["correct"]
  assert (evaluated.parent / "fairness.png").stat().st_size > 0
