"""`python -m data_gen import-raw RAW --labels CSV --images ROOT --out OUT`: the reference
generator's raw output -> our dataset.

The reference's `fairfacegpt.py` writes, for each row of the FairFace label CSV (`file` e.g.
"val/1.jpg") and each of its eight attributes `i`, two text files under `ChatGPT/<model>/`:
`<file up to its first dot>/question_<i>.txt` (the label-free question) and `answer_<i>.txt`
(the model's answer), e.g. `ChatGPT/gpt-4o-2024-11-20/val/1/answer_7.txt`. `i` indexes its
attribute list, in this order: demographics, facial structure, skin texture, expression,
lighting, pose, forensic considerations, and 7 = the detailed description ("Describe this
image."). RAW is that `<model>` folder.

Each (image, i) becomes one record of the TFDS dataset `generate` writes (source
"fairfacegpt-raw"), with the stored question and the labels of its CSV row. A pair is imported
only when both files are there, are UTF-8 text, the question is the reference's question for
`i` and the answer is not empty; every other file is reported with its path and why, exactly
once: a missing partner (a run stopped between the two writes), an index outside 0-7, a
question that does not match its index, a folder with no CSV row, an image that cannot be used.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Sequence

from data_gen import fairface, importer, prompts, tfds_writer
from data_gen.cli import CliError

SOURCE = "fairfacegpt-raw"
# fairfacegpt.py's `attributes` list: `i` in question_<i>.txt / answer_<i>.txt indexes it.
REFERENCE_ATTRIBUTES = ("demographics", "facial_structure", "skin_texture", "expression",
                        "lighting", "pose", "forensic", "description")
_FILE = re.compile(r"(question|answer)_(\d+)\.txt")


@dataclasses.dataclass
class Scan:
  """What a raw folder holds: the importable pairs by image, and every problem found."""
  qa: dict[str, list[tfds_writer.QA]] = dataclasses.field(default_factory=dict)
  found_in: dict[str, str] = dataclasses.field(default_factory=dict)  # image_id -> its folder
  folders: set[str] = dataclasses.field(default_factory=set)  # every folder with such files
  problems: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {path, reason}

  def problem(self, path: str, reason: str) -> None:
    self.problems.append({"path": path, "reason": reason})


def folder_key(file: str) -> str:
  """The folder the reference writes a CSV row's files to: `file` up to its first dot."""
  return file.split(".")[0]


def scan(raw: str, faces: Sequence[fairface.Face],
         bad_rows: Sequence[fairface.BadRow] = ()) -> Scan:
  """Reads every question/answer file under `raw`; pairs are matched to `faces` by folder."""
  by_folder = {folder_key(face.image_id): face for face in reversed(faces)}  # first row wins
  bad_by_folder = {folder_key(row.image_id): row for row in reversed(bad_rows)}
  out, questions = Scan(), prompts.PromptSet()
  for directory, _, names in sorted(os.walk(raw)):
    files = {}
    for name in sorted(names):
      if (match := _FILE.fullmatch(name)):
        files[(match[1], int(match[2]))] = os.path.join(directory, name)
    if not files:
      continue
    folder = os.path.relpath(directory, raw).replace(os.sep, "/")
    out.folders.add(folder)
    face = by_folder.get(folder)
    if face is None:
      row = bad_by_folder.get(folder)
      out.problem(directory, f"its label CSV row (line {row.line}) is unusable: {row.reason}"
                  if row else f"no row of the label CSV has a `file` {folder}.<ext>")
      continue
    for index in sorted({i for _, i in files}):
      pair = _read_pair(files.get(("question", index)), files.get(("answer", index)),
                        directory, index, questions, out)
      if pair is not None:
        out.qa.setdefault(face.image_id, []).append(tfds_writer.QA(*pair, SOURCE))
        out.found_in.setdefault(face.image_id, directory)
  return out


def _read_pair(question_path: str | None, answer_path: str | None, directory: str, index: int,
               questions: prompts.PromptSet, out: Scan) -> tuple[str, str, str] | None:
  """(attribute, question, answer) of one index, or None after reporting its one problem."""
  if index >= len(REFERENCE_ATTRIBUTES):
    for path in filter(None, (question_path, answer_path)):
      out.problem(path, f"index {index} is not one of the reference's attributes 0-"
                        f"{len(REFERENCE_ATTRIBUTES) - 1}")
    return None
  if question_path is None or answer_path is None:
    have, missing = ((answer_path, "question") if question_path is None else
                     (question_path, "answer"))
    out.problem(os.path.join(directory, f"{missing}_{index}.txt"),
                f"missing (its partner {os.path.basename(have)} is there)")
    return None
  texts = []
  for path in (question_path, answer_path):
    try:
      with open(path, encoding="utf-8") as f:
        texts.append(f.read().strip())
    except (OSError, UnicodeDecodeError) as e:
      out.problem(path, f"unreadable ({type(e).__name__}: {e})")
      return None
  question, answer = texts
  attribute = REFERENCE_ATTRIBUTES[index]
  if questions.attribute_of_question(question) != attribute:
    out.problem(question_path, f"asks {question[:80]!r}, not the reference's question {index} "
                               f"({questions.question[attribute]!r})")
    return None
  if not answer:
    out.problem(answer_path, "empty answer")
    return None
  return attribute, questions.question[attribute], answer


def main(argv: Sequence[str] | None = None) -> int:
  parser = importer.parser("python -m data_gen import-raw", __doc__.split("\n")[0],
                           "the reference generator's output folder for one model, e.g."
                           " ChatGPT/gpt-4o-2024-11-20")
  parser.add_argument("--labels", required=True,
                      help="the FairFace label CSV the reference generated from")
  try:
    args = parser.parse_args(argv)
    importer.check_args(args)
    if not os.path.isdir(args.source):
      raise CliError(f"raw folder is not a directory: {args.source}")
    start = time.time()
    faces, bad_rows = fairface.read_labels(args.labels, args.images, check_images=False,
                                           progress=False)
    found = scan(args.source, faces, bad_rows)
    if not found.qa:
      first = f"; first problem: {found.problems[0]}" if found.problems else ""
      raise CliError(f"{args.source}: no question_<i>.txt/answer_<i>.txt pairs to import"
                     f" ({len(found.problems)} problem(s){first})")
    splits, bad = importer.write(found.qa, found.found_in, args.images,
                                 {f.image_id: f.labels for f in faces}, args.out, args.seed,
                                 args.val_fraction, "FairFaceGPT, imported from the reference"
                                 " generator's raw text files.", not args.no_progress)
  except (CliError, fairface.LabelsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  problems = found.problems + [{"path": os.path.join(args.images, b["file"]),
                                "reason": f"{b['reason']} (its answers are in {b['where']})"}
                               for b in bad]
  report = {
      "backend": SOURCE, "pairs": sum(len(v) for v in found.qa.values()),
      "images": len(found.qa) - len(bad), "written": sum(splits.values()), "splits": splits,
      "problems": problems, "skipped_files": len(found.problems), "skipped_images": len(bad),
      "rows_without_folder": sum(folder_key(f.image_id) not in found.folders for f in faces),
      "elapsed_s": round(time.time() - start, 3),
  }
  tfds_writer.write_json(os.path.join(args.out, "report.json"), report)
  for problem in problems:
    print(f"skipped {problem['path']}: {problem['reason']}", file=sys.stderr)
  print(f"wrote {report['written']} QA pairs ({splits}) to {args.out}; skipped files"
        f" {report['skipped_files']}, skipped images {report['skipped_images']}", file=sys.stderr)
  return 0
