"""Multiple-choice training items: the synthetic benchmark's questions, asked about training faces.

A model trained only on free-text descriptions has never seen an option list, so FaceXBench-style
evaluation would measure the format, not the face reading. These items teach the format on the
*training* faces: the question, its distractors and the option order are drawn exactly as
`synth.write_benchmark` draws them for the held-out faces, and the prompt text is
`facexbench.build_prompt`'s own, so a training prompt and a benchmark prompt differ only in the
face and the draw. The target is the option's text (" Female"), which the benchmark's extraction
maps to its letter (its last rule: the first option contained in the answer; no synthetic option
is contained in another's text). With `--answer text_letter` it is the text, then the letter the
prompt asks for, as the prompt prints it (" Female(B)"). A tiny decoder trained from scratch reads
the face long before it learns to find its answer in the option list and copy the letter printed
before it (the letter was at chance after the demo's 340 fine-tuning steps): `pointer` lookups (an
option list, a random option, its letter) teach that part alone, and the demo's card stage mixes
them in for `text_letter` (benchmarks/README.md, demo section, has every form and budget measured).

`python -m data_gen mcq --labels CSV --images ROOT --out OUT [--qa QA_DIR] [--rounds R]
[--answer text|text_letter] [--cards] [--pointers]` writes a TFDS dataset (the `generate` format,
attribute `mcq_<task>`) with R items per (face, task) and, with --qa, every record of a `generate`
output re-written beside them, so one dataset trains both (with a card and a lookup per face).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from data_gen import cards, fairface, inspect, synth, tfds_writer
from data_gen.cli import CliError, OneLineParser, check_out_dir
from facellm_jax.evaluation import facexbench

TASKS = tuple(synth.BENCHMARK_TASKS)
ATTRIBUTE_PREFIX = "mcq_"
SOURCE = "mcq"
# The assistant's reply: the option's text (" Female"), or the text then its letter as the prompt
# prints it (" Female(B)": "(B" is one of the prompt's own tokens, so the reply copies it), which
# FaceXBench's extraction reads as the letter (its "(B)" pattern).
ANSWER_FORMS = ("text", "text_letter")
POINTER_ATTRIBUTE = "pointer"


@dataclasses.dataclass(frozen=True)
class MCQ:
  """One question about one face: what the model is shown and what it must answer."""
  task: str
  question: facexbench.Question
  target: str  # the assistant's reply

  @property
  def prompt(self) -> str:
    """The user turn's text after the image marker, exactly as the benchmark prompts it."""
    return facexbench.build_prompt(self.question).removeprefix(f"{facexbench.IMAGE_MARKER}\n")


def _rng(seed: int, image_id: str, task: str, round_: int) -> np.random.Generator:
  digest = hashlib.sha256(f"mcq|{seed}|{image_id}|{task}|{round_}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def make_mcq(task: str, labels: Mapping[str, str], rng: np.random.Generator,
             image_id: str = "", answer_form: str = "text") -> MCQ:
  """The benchmark's question for `task` about a face with these labels (options shuffled);
  `answer_form` is one of `ANSWER_FORMS`."""
  if task not in synth.BENCHMARK_TASKS:
    raise ValueError(f"unknown MCQ task {task!r}; expected one of {', '.join(TASKS)}")
  if answer_form not in ANSWER_FORMS:
    raise ValueError(f"unknown MCQ answer form {answer_form!r}; expected one of {', '.join(ANSWER_FORMS)}")
  category, sub, prepend, _ = synth.BENCHMARK_TASKS[task]
  text, answer, wrong = synth._question(task, labels, rng)  # pylint: disable=protected-access
  options = tuple(str(o) for o in rng.permutation([answer, *wrong]))
  letter = facexbench.LETTERS[options.index(answer)]
  question = facexbench.Question(
      qid=f"{image_id}/{task}", category=category, task=sub, dataset="synthetic",
      num_images="single", image_paths=(), question_text=text, options=options, correct=letter,
      answer=answer, prepend_text=prepend, postpend_text=synth._POSTPEND,  # pylint: disable=protected-access
      context=None)
  return MCQ(task, question, reply(answer, letter, answer_form))


def reply(option: str, letter: str, answer_form: str) -> str:
  """The assistant's reply naming `option`, printed `letter` in the prompt, in `answer_form`."""
  return f" {option}({letter})" if answer_form == "text_letter" else f" {option}"


def pointer(labels: Mapping[str, str], rng: np.random.Generator,
            tasks: Sequence[str] = TASKS) -> tuple[str, str]:
  """A letter lookup: (prompt, reply). The prompt is the option list of one of the benchmark's
  questions about this face (task, distractors and order drawn as for an MCQ), without the
  question; the reply is one of its options at random, with its letter (" left(C)"). So the text
  is a guess and only the letter can be learned: find the reply's text in the list and copy the
  letter printed before it, as a `text_letter` answer must and a decoder trained from scratch
  has not learned to."""
  task = tasks[int(rng.integers(len(tasks)))]
  options = make_mcq(task, labels, rng).question.options
  k = int(rng.integers(len(options)))
  return facexbench.option_lines(options), reply(options[k], facexbench.LETTERS[k], "text_letter")


def face_mcqs(image_id: str, labels: Mapping[str, str], seed: int, tasks: Sequence[str] = TASKS,
              rounds: int = 1, answer_form: str = "text") -> list[MCQ]:
  """`rounds` draws per task for one face, each a fresh question, distractors and option order;
  deterministic in (seed, image_id, task, round)."""
  return [make_mcq(task, labels, _rng(seed, image_id, task, r), image_id, answer_form)
          for r in range(rounds) for task in tasks]


def _qa_records(qa_dir: str) -> dict[str, list[tfds_writer.QA]]:
  """The QA pairs of a `generate` output, by image id (text only; images come from ROOT)."""
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top  (imports TFDS)

  out: dict[str, list[tfds_writer.QA]] = {}
  source = pipeline.open_tfds_source(qa_dir, "train")
  text = pipeline._text  # pylint: disable=protected-access
  for i in tqdm(range(len(source)), desc="read QA", unit="rec", leave=False):
    r = source[i]
    out.setdefault(text(r["image_id"]), []).append(tfds_writer.QA(
        text(r["attribute"]), text(r["question"]), text(r["answer"]), text(r["source"])))
  return out


def write_dataset(faces: Sequence[fairface.Face], out_dir: str, *, seed: int = 0,
                  tasks: Sequence[str] = TASKS, rounds: int = 1, qa_dir: str | None = None,
                  with_cards: bool = False, pointers: Sequence[str] = (), progress: bool = True,
                  answer_form: str = "text") -> dict[str, int]:
  """Writes the MCQ items of `faces` (and the QA of `qa_dir`, with `with_cards` one
  `data_gen.cards` card per face, and with `pointers` one `pointer` lookup per face, its option
  list drawn from those tasks) as one TFDS dataset, all `train`.

  Returns the record counts: `mcq`, `qa`, `cards`, `pointers` and `total`.
  """
  qa = _qa_records(qa_dir) if qa_dir else {}
  items = []
  num_mcq = 0
  for face in tqdm(faces, desc="MCQ items", unit="face", disable=not progress):
    mcqs = face_mcqs(face.image_id, face.labels, seed, tasks, rounds, answer_form)
    num_mcq += len(mcqs)
    pairs = [tfds_writer.QA(ATTRIBUTE_PREFIX + m.task, m.prompt, m.target, SOURCE) for m in mcqs]
    if with_cards:
      pairs.append(tfds_writer.QA(cards.ATTRIBUTE, cards.QUESTION, cards.card(face.labels),
                                  cards.SOURCE))
    if pointers:
      prompt, target = pointer(face.labels, _rng(seed, face.image_id, POINTER_ATTRIBUTE, 0), pointers)
      pairs.append(tfds_writer.QA(POINTER_ATTRIBUTE, prompt, target, SOURCE))
    items.append(tfds_writer.ImageQA(face.image_id, face.path, face.labels,
                                     qa.get(face.image_id, []) + pairs))
  missing = set(qa) - {face.image_id for face in faces}
  if missing:
    raise ValueError(f"{qa_dir} has QA for {len(missing)} image(s) not in the label CSV, e.g. "
                     f"{sorted(missing)[0]!r}; pass the CSV and image root it was generated from")
  parts = ([f"MCQ items ({', '.join(tasks)})"] if tasks else []) + (["attribute QA"] if qa else []) \
      + (["attribute cards"] if with_cards else []) + (["letter lookups"] if pointers else [])
  tfds_writer.write_dataset(out_dir, items, {i.image_id: "train" for i in items},
                            description=f"Synthetic faces: {', '.join(parts)}.")
  counts = {"mcq": num_mcq, "qa": sum(len(v) for v in qa.values()),
            "cards": len(faces) if with_cards else 0, "pointers": len(faces) if pointers else 0}
  return counts | {"total": sum(counts.values())}


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = OneLineParser(prog="python -m data_gen mcq", description=__doc__.split("\n")[0])
  p.add_argument("--labels", required=True, help="label CSV with the synthetic world's columns")
  p.add_argument("--images", required=True, help="image root; the CSV's `file` is relative")
  p.add_argument("--out", required=True, help="output TFDS dataset directory")
  p.add_argument("--qa", help="a `python -m data_gen generate` output to include")
  p.add_argument("--rounds", type=int, default=1, help="questions per (face, task)")
  p.add_argument("--cards", action="store_true",
                 help="add one attribute card per face (data_gen.cards)")
  p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {','.join(TASKS)}")
  p.add_argument("--pointers", action="store_true",
                 help="add one letter lookup per face: an option list of --tasks, a random option "
                      "and its letter (`pointer`)")
  p.add_argument("--answer", choices=ANSWER_FORMS, default="text",
                 help="the reply: the option's text, or the text then its letter (' Female(B)')")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  try:
    args = _parse(sys.argv[1:] if argv is None else argv)
    check_out_dir(args.out)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
      raise CliError(f"--tasks: unknown {unknown or 'empty list'}; expected some of {','.join(TASKS)}")
    if args.rounds < 1:
      raise CliError(f"--rounds must be >= 1, got {args.rounds}")
    if args.qa and not os.path.isfile(os.path.join(args.qa, "dataset_info.json")):
      raise CliError(f"--qa {args.qa} is not a dataset written by `python -m data_gen generate`")
    if args.qa:
      inspect.summarize(args.qa, samples=0)  # a damaged --qa dataset: one line, not a traceback
    faces, bad = fairface.read_labels(args.labels, args.images, progress=not args.no_progress)
    lacking = synth.missing_columns(faces[0].labels) if faces else []
    if lacking:
      raise CliError(f"{args.labels}: MCQ items need the synthetic world's label columns; missing "
                     f"{','.join(lacking)} (write the faces with `python -m data_gen synth`)")
    faces, unknown = synth.known_faces(faces)  # a label value no option list has: a bad row
    bad += unknown
    if not faces:
      raise CliError(f"{args.labels}: no usable images ({len(bad)} bad rows)")
    counts = write_dataset(faces, args.out, seed=args.seed, tasks=tasks, rounds=args.rounds,
                           qa_dir=args.qa, with_cards=args.cards,
                           pointers=tasks if args.pointers else (), progress=not args.no_progress,
                           answer_form=args.answer)
  except (CliError, fairface.LabelsError, ValueError, FileNotFoundError) as e:
    print(f"mcq: error: {e}", file=sys.stderr)
    return 2
  for row in bad:
    print(row.skipped(args.labels), file=sys.stderr)
  print(f"wrote {counts['mcq']} MCQ items, {counts['qa']} QA pairs, {counts['cards']} cards and "
        f"{counts['pointers']} letter lookups to {args.out}", file=sys.stderr)
  return 0
