"""FaceXBench: load the benchmark, prompt a model and score it exactly as the benchmark does.

Scores are only comparable with the paper's if the prompt and the answer extraction are the
benchmark's own, so every rule here mirrors the public FaceXBench code
(github.com/Kartik-3004/facexbench), quirks included:
- `evaluate.py` builds the text prompt and stores `output.strip()` as the prediction;
- `aggregate_results.py` extracts the option letter and aggregates per category, per
  sub-category (our "task") and per `num_images`;
- the paper's InternVL numbers went through VLMEvalKit's InternVL wrapper
  (`vlmeval/vlm/internvl/utils.py: reorganize_prompt`), which places the image markers.

The model side expands each `IMAGE_MARKER` into InternVL's `<img><IMG_CONTEXT>...</img>`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from tqdm import tqdm

from facellm_jax import paths

IMAGE_MARKER = "<image>"
MAX_OPTIONS = 4  # evaluate.py only labels A-D; a fifth option never reaches the model.
LETTERS = "ABCD"

# aggregate_results.py's label patterns, in its order. The first one alone matches almost
# everything ("A", "A.", "A:", "(A)" after the start), which is why "A woman, so (D)" -> A.
_LABEL_PATTERNS = tuple(re.compile(p) for p in (
    r"\b\(?([A-Za-z])\)?\b",  # A, (A) when not at the very start
    r"\bOption\s+([A-Za-z])\b",  # Option A
    r"\b([A-Za-z])\.",  # A.
    r"\b([A-Za-z]):",  # A:
    r"\b([A-Za-z])\s+-",  # A -
    r"\b\(([A-Za-z])\)",  # (A)
))


@dataclasses.dataclass(frozen=True)
class Question:
  """One benchmark question, with image paths made absolute against the benchmark root."""
  qid: str  # "<json stem>/<question id>", unique across files
  category: str
  task: str  # the JSON's "sub-category"
  dataset: str
  num_images: str  # the file's label: "single" | "multiple" ("zero" in tools_retrieval)
  image_paths: tuple[Path, ...]
  question_text: str
  options: tuple[str, ...]
  correct: str  # "A".."D"
  answer: str
  prepend_text: str
  postpend_text: str
  context: str | None  # the tools_use API listing; only tools_use prompts carry it


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  """What `generate_fn` receives: the prompt text and its images in marker order."""
  qid: str
  text: str
  image_paths: tuple[Path, ...]


GenerateFn = Callable[[list[EvalPrompt]], list[str]]


def load_benchmark(root: str | Path) -> list[Question]:
  """Reads every `*.json` directly in `root` (as evaluate.py does), sorted by file name.

  Every referenced image must exist, so a broken benchmark fails here, before any model time.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"FaceXBench folder {root} does not exist or is not a folder.")
  files = sorted(root.glob("*.json"))
  if not files:
    raise ValueError(f"No FaceXBench *.json files in {root}; expected files such as "
                     "fairface_single_mcq_age_test.json next to an images/ folder.")
  questions = []
  for path in files:
    questions.extend(_load_file(path, root))
  return questions


def _load_file(path: Path, root: Path) -> list[Question]:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}.")
  for key in ("category", "sub-category", "questions"):
    if key not in data:
      raise ValueError(f"{path}: missing top-level field {key!r}.")
  if not isinstance(data["questions"], dict):
    raise ValueError(f"{path}: 'questions' must be an object of id -> question, found "
                     f"{type(data['questions']).__name__}.")
  file_context = data.get("context")
  questions = []
  for qid, entry in data["questions"].items():
    where = f"{path} question {qid!r}"
    if not isinstance(entry, dict):
      raise ValueError(f"{where}: expected an object, found {type(entry).__name__}.")
    for key in ("image_paths", "question_text", "options", "correct_answer_option"):
      if key not in entry:
        raise ValueError(f"{where}: missing field {key!r}.")
    options = entry["options"]
    if (not isinstance(options, list) or not 1 <= len(options) <= MAX_OPTIONS
        or not all(isinstance(o, (str, int, float)) for o in options)):
      raise ValueError(f"{where}: 'options' must be a list of 1 to {MAX_OPTIONS} strings, "
                       f"found {options!r}.")
    options = tuple(str(o) for o in options)
    correct = entry["correct_answer_option"]
    if correct not in LETTERS[:len(options)]:
      raise ValueError(f"{where}: 'correct_answer_option' must be one of "
                       f"{list(LETTERS[:len(options)])}, found {correct!r}.")
    image_paths = entry["image_paths"]
    if (not isinstance(image_paths, list) or not image_paths
        or not all(isinstance(p, str) for p in image_paths)):
      raise ValueError(f"{where}: 'image_paths' must be a non-empty list of paths relative "
                       f"to {root}, found {image_paths!r}.")
    resolved = tuple((root / p).resolve() for p in image_paths)
    for rel, full in zip(image_paths, resolved):
      if not full.is_file():
        raise FileNotFoundError(f"{where}: image {rel!r} not found at {full}.")
    context = entry.get("context", file_context)
    if data["category"] == "tools_use" and not isinstance(context, str):
      raise ValueError(f"{where}: a tools_use question needs a 'context' (the API listing), "
                       "in the file or the question.")
    questions.append(Question(
        qid=f"{path.stem}/{qid}",
        category=str(data["category"]),
        task=str(data["sub-category"]),
        dataset=str(data.get("dataset", "")),
        num_images=str(data.get("num_images", "unknown")),  # aggregate_results.py's default
        image_paths=resolved,
        question_text=str(entry["question_text"]),
        options=options,
        correct=correct,
        answer=str(entry.get("answer", options[LETTERS.index(correct)])),
        prepend_text=str(data.get("prepend_text") or ""),
        postpend_text=str(data.get("postpend_text") or ""),
        context=context))
  return questions


def option_lines(options: Sequence[str]) -> str:
  """The prompt's option list: "(A) ...", one line each, each ending in a newline."""
  return "".join(f"({letter}) {option}\n" for letter, option in zip(LETTERS, options))


def build_prompt(q: Question, prepend: bool = False) -> str:
  """The benchmark's prompt, with one `IMAGE_MARKER` per image.

  Text (evaluate.py): [tools_use context] [prepend_text, only with --prepend_text]
  question, postpend_text, then "(A) ..." lines, each part ending in a newline (the trailing
  one included). Images (VLMEvalKit's InternVL `reorganize_prompt`, images before the text as
  FaceXBench sends them): one image -> "<image>\\n" + text; several ->
  "Image-1: <image>\\nImage-2: <image>\\n..." + text.
  """
  text = ""
  if q.category == "tools_use":
    text += f"{q.context}\n"
  if prepend and q.prepend_text:
    text += f"{q.prepend_text}\n"
  text += f"{q.question_text}\n"
  if q.postpend_text:
    text += f"{q.postpend_text}\n"
  text += option_lines(q.options)
  if len(q.image_paths) == 1:
    return f"{IMAGE_MARKER}\n{text}"
  markers = "".join(f"Image-{i}: {IMAGE_MARKER}\n" for i in range(1, len(q.image_paths) + 1))
  return markers + text


def extract_answer(text: str, options: Sequence[str]) -> str | None:
  """The option letter in a model's answer, by aggregate_results.py's rules (contract).

  Valid letters are the first len(options) capitals; lowercase letters never count. In order:
  1. a pattern matching at the very start, patterns tried in order ("A woman, so (D)" -> A:
     the first pattern takes the leading "A");
  2. each pattern anywhere, in pattern order, the first valid letter found ("Answer: C" -> C,
     since "Answer" is no single letter);
  3. the first option, in option order, equal to or contained in the answer (case-sensitive,
     so with options ["0-2", "20-29", ...] the answer "20-29" picks "0-2": the benchmark's
     substring quirk).
  Returns None when nothing matches; None is scored as wrong.
  """
  labels = LETTERS[:min(len(options), MAX_OPTIONS)]
  clean = text.strip()
  for pattern in _LABEL_PATTERNS:
    match = pattern.match(clean)
    if match and match.group(1) in labels:
      return match.group(1)
  for pattern in _LABEL_PATTERNS:
    for label in pattern.findall(clean):
      if label in labels:
        return label
  for label, option in zip(labels, options):
    if option.strip() in clean:  # also covers the benchmark's equality test
      return label
  return None


def evaluate(questions: Sequence[Question], generate_fn: GenerateFn, out_dir: str | os.PathLike,
             batch_size: int = 8, prepend: bool = False, *, write: bool = True, by_length: bool = True) -> dict:
  """Runs `generate_fn` over the questions not yet answered in `out_dir`, then scores all.

  `out_dir` (a folder or a `gs://` URL) gets `predictions.jsonl`, one line per answered question,
  stored per batch (`paths.RecordFile`: appended locally, rewritten on GCS), so an interrupted
  run resumes where it stopped. The report is recomputed from the stored prediction texts (as
  aggregate_results.py re-extracts from saved outputs) and written to `out_dir/report.json`.
  Accuracies are fractions in [0, 1] (the paper prints percentages).

  `by_length` answers the pending questions shortest prompt first (images, then characters), so
  each batch holds prompts of about one length: less padding, and fewer distinct shapes to
  compile; predictions.jsonl then lists them in that order. `write=False` (the other processes
  of a multi-host run) answers every question given, in the same batches, and touches nothing;
  it returns {}.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  seen = set()
  for q in questions:
    if q.qid in seen:
      raise ValueError(f"Question id {q.qid!r} appears twice; ids must be unique.")
    seen.add(q.qid)
  out_dir = paths.makedirs(out_dir) if write else paths.path(out_dir)
  predictions = paths.RecordFile(out_dir / "predictions.jsonl") if write else None
  done = _answered(predictions) if write else {}
  pending = [q for q in questions if q.qid not in done]
  if by_length:
    pending.sort(key=lambda q: (len(q.image_paths), len(build_prompt(q, prepend))))
  with tqdm(total=len(questions), initial=len(questions) - len(pending), desc="FaceXBench", unit="q",
            disable=not write) as bar:
    for start in range(0, len(pending), batch_size):
      batch = pending[start:start + batch_size]
      prompts = [EvalPrompt(q.qid, build_prompt(q, prepend), q.image_paths) for q in batch]
      outputs = generate_fn(prompts)
      if len(outputs) != len(batch):
        raise ValueError(f"generate_fn returned {len(outputs)} answers for a batch of "
                         f"{len(batch)} prompts; it must return one string per prompt.")
      records = [_record(q, output) for q, output in zip(batch, outputs)]
      if write:
        predictions.append(records)
      done.update((r["qid"], r) for r in records)
      bar.update(len(batch))
  if not write:
    return {}
  report = score(questions, done)
  report["prepend_text"] = prepend
  paths.write_json(out_dir / "report.json", report)
  return report


def _record(q: Question, output: str) -> dict:
  prediction = output.strip()  # evaluate.py stores the stripped output
  extracted = extract_answer(prediction, q.options)
  return {"qid": q.qid, "task": q.task, "category": q.category, "num_images": q.num_images,
          "prediction": prediction, "extracted": extracted, "correct": q.correct,
          "is_correct": extracted == q.correct}


def answered(out_dir: str | os.PathLike) -> dict[str, dict]:
  """The questions already answered in `out_dir` (its predictions.jsonl), by qid."""
  return _answered(paths.RecordFile(paths.path(out_dir) / "predictions.jsonl"))


def _answered(predictions: paths.RecordFile) -> dict[str, dict]:
  """Answered questions by qid; every stored line must be a prediction record."""
  done = {}
  for number, record in enumerate(predictions.records, start=1):
    if not isinstance(record.get("qid"), str) or not isinstance(record.get("prediction"), str):
      raise ValueError(f"{predictions.path}:{number}: expected an object with 'qid' and 'prediction' "
                       "strings; delete the file to start the evaluation over.")
    done[record["qid"]] = record
  return done


def score(questions: Iterable[Question], predictions: Mapping[str, Mapping]) -> dict:
  """aggregate_results.py's totals, from the prediction texts (`predictions[qid]["prediction"]`).

  Questions without a prediction count as unanswered and wrong. Groups appear in order of
  first appearance; each holds `accuracy`, `correct` and `total`.
  """
  tallies = {key: collections.defaultdict(lambda: [0, 0])
             for key in ("per_category", "per_task", "single_vs_multiple")}
  total = correct = unanswered = 0
  for q in questions:
    record = predictions.get(q.qid)
    extracted = None if record is None else extract_answer(record["prediction"], q.options)
    hit = extracted == q.correct
    total += 1
    correct += hit
    unanswered += extracted is None
    for key, group in (("per_category", q.category), ("per_task", q.task),
                       ("single_vs_multiple", q.num_images)):
      tallies[key][group][0] += hit
      tallies[key][group][1] += 1
  report = {"total_questions": total, "correct": correct, "overall": _ratio(correct, total),
            "unanswered": unanswered}
  for key, groups in tallies.items():
    report[key] = {group: {"accuracy": _ratio(c, n), "correct": c, "total": n}
                   for group, (c, n) in groups.items()}
  return report


def _ratio(correct: int, total: int) -> float:
  return correct / total if total else 0.0  # aggregate_results.py reports 0 for no questions
