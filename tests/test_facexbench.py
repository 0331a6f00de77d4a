"""FaceXBench runner: the benchmark's prompt, its answer extraction, exact scoring, resume."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from facellm_jax.evaluation import facexbench
from facellm_jax.evaluation.facexbench import EvalPrompt, Question

AGE_OPTIONS = ["30-39", "20-29", "40-49", "10-19"]
POSTPEND = ("Please answer the question and provide only the correct option letter, "
            "e.g., A, B, C, D.")

# (model output, options, expected letter). Expected values follow FaceXBench's
# aggregate_results.py: labels are the capitals A..D (len(options)); first any pattern
# matching at the start, then any pattern anywhere, then the option text as a substring.
EXTRACT_CASES = [
    ("A", AGE_OPTIONS, "A"),
    ("  B  ", AGE_OPTIONS, "B"),  # stripped first
    ("B.", AGE_OPTIONS, "B"),
    ("D: 10-19", AGE_OPTIONS, "D"),
    ("C - 40-49", AGE_OPTIONS, "C"),
    ("Option C", AGE_OPTIONS, "C"),  # the "Option X" pattern at the start
    # The leading article "A" is a lone capital at the start: the benchmark takes it.
    ("A woman, so (D)", AGE_OPTIONS, "A"),
    # "(B)" at the start: \b cannot sit before "(", so no start pattern matches; the
    # anywhere search still finds B.
    ("(B)", AGE_OPTIONS, "B"),
    ("(C) 40-49", AGE_OPTIONS, "C"),
    ("Answer: C", AGE_OPTIONS, "C"),  # "Answer" is no lone letter; C is found anywhere
    ("I think it is D", AGE_OPTIONS, "D"),  # "I" is a lone capital but not a label
    ("It is B, not C", AGE_OPTIONS, "B"),  # first valid letter in the text wins
    ("e.g., A, B, C, D", AGE_OPTIONS, "A"),  # an echoed instruction answers A
    # Lowercase letters are never labels...
    ("b", AGE_OPTIONS, None),
    ("The answer is (d).", AGE_OPTIONS, None),
    # ...but the option text still counts: "20-29" is option B.
    ("b) 20-29", AGE_OPTIONS, "B"),
    ("c. 40-49", AGE_OPTIONS, "C"),
    ("X. 30-39", AGE_OPTIONS, "A"),  # X is no label; the text 30-39 is option A
    ("20-29", AGE_OPTIONS, "B"),  # option text only
    ("I would say 10-19 years", AGE_OPTIONS, "D"),  # option text inside a sentence
    # Substring quirk: options are tried in order and "0-2" is inside "20-29".
    ("20-29", ["0-2", "20-29", "3-9", "10-19"], "A"),
    ("Female", ["Male", "Female"], "B"),  # case-sensitive: "Male" is not in "Female"
    ("C", ["Male", "Female"], None),  # only as many labels as options
    ("I chose (E)", AGE_OPTIONS, None),
    ("I am not sure", AGE_OPTIONS, None),
    ("", AGE_OPTIONS, None),
]


@pytest.mark.parametrize("text,options,expected", EXTRACT_CASES)
def test_extract_answer_follows_the_benchmark_rules(text, options, expected):
  assert facexbench.extract_answer(text, options) == expected


def _question(**overrides) -> Question:
  fields = dict(qid="f/1", category="bias_fairness", task="age", dataset="fairface",
                num_images="single", image_paths=(Path("/x/1.png"),),
                question_text="What is the age of the person?", options=tuple(AGE_OPTIONS),
                correct="A", answer="30-39", prepend_text="Age estimation task.",
                postpend_text=POSTPEND, context=None)
  fields.update(overrides)
  return Question(**fields)


def test_single_image_prompt_is_the_benchmarks():
  prompt = facexbench.build_prompt(_question())
  assert prompt == ("<image>\nWhat is the age of the person?\n" + POSTPEND + "\n"
                    "(A) 30-39\n(B) 20-29\n(C) 40-49\n(D) 10-19\n")


def test_prepend_text_only_with_the_flag():
  assert "Age estimation task." not in facexbench.build_prompt(_question())
  prompt = facexbench.build_prompt(_question(), prepend=True)
  assert prompt.startswith("<image>\nAge estimation task.\nWhat is the age")


def test_multi_image_prompt_numbers_every_image_in_order():
  q = _question(num_images="multiple", image_paths=(Path("/a.png"), Path("/b.png"),
                                                     Path("/c.png")),
                question_text="Who is oldest?", postpend_text="",
                options=("Image 1", "Image 2", "Image 3"))
  assert facexbench.build_prompt(q) == (
      "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\n"
      "Who is oldest?\n(A) Image 1\n(B) Image 2\n(C) Image 3\n")


def test_tools_use_prompt_starts_with_the_context():
  q = _question(category="tools_use", task="tools_retrieval", context="1. api_1: age",
                prepend_text="Tools task.")
  assert facexbench.build_prompt(q, prepend=True).startswith(
      "<image>\n1. api_1: age\nTools task.\nWhat is the age")


# ---------------------------------------------------------------- a small benchmark on disk

# qid -> (correct letter, scripted model output, expected extraction)
SCRIPT = {
    "fairface_single_mcq_age_test/1": ("A", "A", "A"),
    "fairface_single_mcq_age_test/2": ("B", "(B) 20-29", "B"),
    "fairface_single_mcq_age_test/3": ("C", "I don't know", None),
    "fairface_single_mcq_age_test/4": ("D", "A woman, so (D)", "A"),
    "fairface_multiple_mcq_gender_test/1": ("B", "Image 2", "B"),
    "fairface_multiple_mcq_gender_test/2": ("A", "answer: c", None),
    "fairface_multiple_mcq_gender_test/3": ("C", " C\n", "C"),
    "celeba_single_mcq/1": ("A", "A", "A"),
    "celeba_single_mcq/2": ("B", "D", "D"),
    "celeba_single_mcq/3": ("C", "Answer: C", "C"),
    "tools_retrieval/1": ("D", "D", "D"),
    "tools_retrieval/2": ("A", "B", "B"),
}
IMAGES_PER_QUESTION = {"fairface_multiple_mcq_gender_test/1": 2,
                       "fairface_multiple_mcq_gender_test/2": 3,
                       "fairface_multiple_mcq_gender_test/3": 2}
FILES = {  # stem -> (category, sub-category, num_images, options, extra top-level fields)
    "fairface_single_mcq_age_test": ("bias_fairness", "age", "single", AGE_OPTIONS, {}),
    "fairface_multiple_mcq_gender_test": (
        "bias_fairness", "gender", "multiple",
        ["Image 1", "Image 2", "Both Images", "None of the above"], {}),
    "celeba_single_mcq": ("attributes_expression", "attributes", "single",
                          ["Smiling", "Eyeglasses", "Bald", "Wearing hat"], {}),
    "tools_retrieval": ("tools_use", "tools_retrieval", "zero",
                        ["api_1", "api_2", "api_3", "api_1, api_2"],
                        {"context": "Ignore the black image provided.\n1. api_1: age"}),
}


def write_benchmark(root: Path) -> None:
  for stem, (category, task, num_images, options, extra) in FILES.items():
    questions = {}
    for qid, (correct, _, _) in SCRIPT.items():
      if not qid.startswith(stem + "/"):
        continue
      number = qid.split("/")[1]
      paths = []
      for i in range(IMAGES_PER_QUESTION.get(qid, 1)):
        rel = f"images/{stem}/question_{number}_{i + 1}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (40 * i, 90, 200)).save(root / rel)
        paths.append(rel)
      questions[number] = {"image_paths": paths, "question_text": f"Question {qid}?",
                           "options": options, "correct_answer_option": correct,
                           "answer": options["ABCD".index(correct)]}
    data = {"category": category, "sub-category": task, "dataset": stem.split("_")[0],
            "question_type": "MCQ", "num_images": num_images, "prepend_text": "Context.",
            "postpend_text": POSTPEND, **extra, "questions": questions}
    (root / f"{stem}.json").write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("facexbench")
  write_benchmark(root)
  return root


@pytest.fixture(scope="module")
def questions(bench_root) -> list[Question]:
  return facexbench.load_benchmark(bench_root)


class ScriptedModel:
  """Answers from SCRIPT and checks what the runner sends it."""

  def __init__(self, fail_after_calls: int | None = None):
    self.seen: list[str] = []
    self.calls = 0
    self.fail_after_calls = fail_after_calls

  def __call__(self, batch: list[EvalPrompt]) -> list[str]:
    if self.fail_after_calls is not None and self.calls == self.fail_after_calls:
      raise RuntimeError("simulated crash")
    self.calls += 1
    answers = []
    for prompt in batch:
      assert prompt.text.count("<image>") == len(prompt.image_paths)
      assert all(p.is_absolute() and p.is_file() for p in prompt.image_paths)
      self.seen.append(prompt.qid)
      answers.append(SCRIPT[prompt.qid][1])
    return answers


def test_load_benchmark_reads_every_file_and_question(questions, bench_root):
  assert [q.qid for q in questions] == sorted(SCRIPT, key=lambda k: (k.split("/")[0], k))
  by_id = {q.qid: q for q in questions}
  multi = by_id["fairface_multiple_mcq_gender_test/2"]
  assert multi.num_images == "multiple" and multi.task == "gender"
  assert multi.image_paths == tuple(
      (bench_root / f"images/fairface_multiple_mcq_gender_test/question_2_{i}.png").resolve()
      for i in (1, 2, 3))
  tools = by_id["tools_retrieval/1"]
  assert tools.category == "tools_use" and tools.context.startswith("Ignore the black image")
  assert by_id["celeba_single_mcq/2"].answer == "Eyeglasses"
  assert by_id["celeba_single_mcq/2"].prepend_text == "Context."


EXPECTED_REPORT = {
    "total_questions": 12, "correct": 7, "overall": 7 / 12, "unanswered": 2,
    "per_category": {
        "attributes_expression": {"accuracy": 2 / 3, "correct": 2, "total": 3},
        "bias_fairness": {"accuracy": 4 / 7, "correct": 4, "total": 7},
        "tools_use": {"accuracy": 1 / 2, "correct": 1, "total": 2},
    },
    "per_task": {
        "attributes": {"accuracy": 2 / 3, "correct": 2, "total": 3},
        "age": {"accuracy": 2 / 4, "correct": 2, "total": 4},
        "gender": {"accuracy": 2 / 3, "correct": 2, "total": 3},
        "tools_retrieval": {"accuracy": 1 / 2, "correct": 1, "total": 2},
    },
    "single_vs_multiple": {
        "single": {"accuracy": 4 / 7, "correct": 4, "total": 7},
        "multiple": {"accuracy": 2 / 3, "correct": 2, "total": 3},
        "zero": {"accuracy": 1 / 2, "correct": 1, "total": 2},
    },
    "prepend_text": False,
}


def test_scripted_model_is_scored_exactly(questions, tmp_path):
  model = ScriptedModel()
  report = facexbench.evaluate(questions, model, tmp_path, batch_size=5)
  assert report == EXPECTED_REPORT
  assert json.loads((tmp_path / "report.json").read_text()) == EXPECTED_REPORT
  assert model.calls == 3 and sorted(model.seen) == sorted(SCRIPT)
  lines = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  assert len(lines) == 12
  for line in lines:
    correct, output, extracted = SCRIPT[line["qid"]]
    assert line["prediction"] == output.strip()
    assert (line["extracted"], line["correct"]) == (extracted, correct)
    assert line["is_correct"] == (extracted == correct)
    assert line["task"] in EXPECTED_REPORT["per_task"]


def test_rerun_answers_only_the_unanswered_questions(questions, tmp_path):
  with pytest.raises(RuntimeError, match="simulated crash"):
    facexbench.evaluate(questions, ScriptedModel(fail_after_calls=2), tmp_path, batch_size=4)
  predictions = tmp_path / "predictions.jsonl"
  first = [json.loads(l)["qid"] for l in predictions.read_text().splitlines()]
  assert len(first) == 8
  with open(predictions, "a") as f:  # a line torn by a crash mid-write
    f.write('{"qid": "tools_retrieval/2", "predic')
  model = ScriptedModel()
  report = facexbench.evaluate(questions, model, tmp_path, batch_size=4)
  assert sorted(model.seen) == sorted(set(SCRIPT) - set(first))
  assert report == EXPECTED_REPORT
  lines = [json.loads(l)["qid"] for l in predictions.read_text().splitlines()]
  assert sorted(lines) == sorted(SCRIPT)
  again = ScriptedModel()
  assert facexbench.evaluate(questions, again, tmp_path) == EXPECTED_REPORT
  assert again.calls == 0


def test_generate_fn_must_answer_every_prompt(questions, tmp_path):
  with pytest.raises(ValueError, match="returned 1 answers for a batch of 2"):
    facexbench.evaluate(questions, lambda batch: ["A"], tmp_path, batch_size=2)


def test_folder_without_json_is_a_clear_error(tmp_path):
  expected = f"No FaceXBench .*json files in {re.escape(str(tmp_path))}"
  with pytest.raises(ValueError, match=expected):
    facexbench.load_benchmark(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    facexbench.load_benchmark(tmp_path / "missing")


def test_missing_image_names_file_question_and_path(tmp_path):
  write_benchmark(tmp_path)
  missing = tmp_path / "images/celeba_single_mcq/question_2_1.png"
  missing.unlink()
  with pytest.raises(FileNotFoundError) as error:
    facexbench.load_benchmark(tmp_path)
  message = str(error.value)
  assert "celeba_single_mcq.json question '2'" in message
  assert str(missing.resolve()) in message


def test_malformed_entry_names_file_and_question(tmp_path):
  write_benchmark(tmp_path)
  path = tmp_path / "celeba_single_mcq.json"
  data = json.loads(path.read_text())
  data["questions"]["3"]["correct_answer_option"] = "E"
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"celeba_single_mcq\.json question '3'.*'E'"):
    facexbench.load_benchmark(tmp_path)
  path.write_text("{not json")
  with pytest.raises(ValueError, match=r"celeba_single_mcq\.json: not valid JSON"):
    facexbench.load_benchmark(tmp_path)


def test_pending_questions_go_shortest_prompt_first_unless_asked_otherwise(questions, tmp_path):
  size = {q.qid: (len(q.image_paths), len(facexbench.build_prompt(q))) for q in questions}
  model = ScriptedModel()
  assert facexbench.evaluate(questions, model, tmp_path / "sorted", batch_size=4) == EXPECTED_REPORT
  assert [size[qid] for qid in model.seen] == sorted(size.values()) != [size[q.qid] for q in questions]
  in_order = ScriptedModel()
  assert facexbench.evaluate(questions, in_order, tmp_path / "given", batch_size=4, by_length=False) == EXPECTED_REPORT
  assert in_order.seen == [q.qid for q in questions]
