"""`python -m data_gen import-sharegpt`: the published FairFaceGPT dataset.json -> our dataset.

The published file is ShareGPT-style,
`[{"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": ...}],
"image": "val/1.jpg"}, ...]`, with images relative to a FairFace root. It becomes the same TFDS
dataset `generate` writes (source "sharegpt"), so training never cares where QA came from. An
image path that would leave the root is an error for the whole file (such a file is not to be
trusted); a missing or unreadable image only skips its entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import tqdm

from data_gen import fairface, prompts, tfds_writer
from data_gen.cli import CliError, OneLineParser, check_out_dir

SOURCE = "sharegpt"
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


@dataclasses.dataclass(frozen=True)
class Pair:
  entry: int  # index in the JSON list
  image_id: str
  question: str
  answer: str


def read_pairs(path: str) -> list[Pair]:
  """Every (question, answer) turn pair, in file order; structural problems raise CliError."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise CliError(f"cannot read ShareGPT file {path}: {e}") from e
  if not isinstance(data, list):
    raise CliError(f"{path}: expected a JSON list of entries, found {type(data).__name__}")
  pairs = []
  for index, entry in enumerate(data):
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
      raise CliError(f"{where}: expected an object with an `image` path and `conversations`")
    image = entry["image"]
    if not fairface.safe_relative_path(image):
      raise CliError(f"{where}: image path {image!r} escapes the image root (absolute or `..`)")
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
      raise CliError(f"{where}: `conversations` must be a list of {{from, value}} turns")
    roles = [t.get("from") for t in turns]
    for i in range(0, len(turns), 2):
      if roles[i] not in _USER_ROLES or i + 1 >= len(turns) or roles[i + 1] not in _ASSISTANT_ROLES:
        raise CliError(f"{where}: expected alternating human/gpt turns, found {roles}")
      question = turns[i]["value"].replace("<image>", "").strip()
      pairs.append(Pair(index, image, question, turns[i + 1]["value"].strip()))
  return pairs


def import_pairs(pairs: Sequence[Pair], image_root: str, labels: dict[str, dict[str, str]],
                 out: str, seed: int, val_fraction: float,
                 progress: bool = True) -> dict[str, object]:
  """Checks images, maps questions to attributes, writes the dataset and report.json."""
  start = time.time()
  prompt_set = prompts.PromptSet()
  grouped: dict[str, list[tfds_writer.QA]] = {}
  seen: set[tuple[str, str]] = set()
  duplicates = empty = unmatched = 0
  first_entry: dict[str, int] = {}
  for pair in pairs:
    if not pair.answer:
      empty += 1
      continue
    attribute = prompt_set.attribute_of_question(pair.question)
    unmatched += attribute is None
    attribute = attribute or "other"
    key = (pair.image_id, attribute if attribute != "other" else pair.question)
    if key in seen:
      duplicates += 1
      continue
    seen.add(key)
    first_entry.setdefault(pair.image_id, pair.entry)
    grouped.setdefault(pair.image_id, []).append(
        tfds_writer.QA(attribute, pair.question, pair.answer, SOURCE))
  root = os.path.abspath(image_root)
  items, bad = [], []
  for image_id, qa in tqdm.tqdm(grouped.items(), desc="checking images", unit="img",
                                disable=not progress, leave=False):
    path = os.path.join(root, image_id)
    reason = fairface.image_problem(root, image_id)
    if reason:
      bad.append({"entry": first_entry[image_id], "file": image_id, "reason": reason})
    else:
      items.append(tfds_writer.ImageQA(image_id, path, labels.get(image_id, {}), qa))
  splits = {}
  if items:
    split_of = tfds_writer.assign_splits([i.image_id for i in items], seed, val_fraction)
    splits = tfds_writer.write_dataset(out, items, split_of,
                                       description="FairFaceGPT, imported from ShareGPT JSON.")
  else:
    os.makedirs(out, exist_ok=True)
  report = {
      "backend": SOURCE, "pairs": len(pairs), "images": len(items),
      "written": sum(splits.values()), "splits": splits, "duplicates": duplicates,
      "empty_answers": empty, "unmatched_questions": unmatched, "bad_images": bad,
      "skipped_images": len(bad), "elapsed_s": round(time.time() - start, 3),
  }
  tfds_writer.write_json(os.path.join(out, "report.json"), report)
  return report


def main(argv: Sequence[str] | None = None) -> int:
  parser = OneLineParser(prog="python -m data_gen import-sharegpt",
                         description=__doc__.split("\n")[0])
  parser.add_argument("dataset_json", help="the published FairFaceGPT dataset.json")
  parser.add_argument("--images", required=True, help="FairFace image root")
  parser.add_argument("--out", required=True, help="output TFDS dataset directory")
  parser.add_argument("--labels", help="FairFace label CSV to fill age/gender/race (optional)")
  parser.add_argument("--seed", type=int, default=0, help="train/validation split seed")
  parser.add_argument("--val-fraction", type=float, default=0.0)
  parser.add_argument("--no-progress", action="store_true")
  try:
    args = parser.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
      raise CliError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not os.path.isdir(args.images):
      raise CliError(f"image root is not a directory: {args.images}")
    check_out_dir(args.out)
    pairs = read_pairs(args.dataset_json)
    labels = {}
    if args.labels:
      faces, _ = fairface.read_labels(args.labels, args.images, check_images=False,
                                      progress=False)
      labels = {f.image_id: f.labels for f in faces}
    report = import_pairs(pairs, args.images, labels, args.out, args.seed, args.val_fraction,
                          progress=not args.no_progress)
  except (CliError, fairface.LabelsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for row in report["bad_images"]:
    print(f"skipped entry {row['entry']} ({row['file']}): {row['reason']}", file=sys.stderr)
  print(f"wrote {report['written']} QA pairs ({report['splits']}) to {args.out};"
        f" duplicates {report['duplicates']}, skipped images {report['skipped_images']}",
        file=sys.stderr)
  return 0
