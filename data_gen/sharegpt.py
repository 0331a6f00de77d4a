"""`python -m data_gen import-sharegpt`: a ShareGPT file, as LLaMA-Factory reads it -> our dataset.

The published FairFaceGPT dataset.json is what the reference trains on through LLaMA-Factory
(its dataset_info.json: formatting "sharegpt", messages column `conversations`, image column
`image`, roles `human` / `assistant` under `from` / `value`). This importer accepts every
variant of that format LLaMA-Factory reads for one image per example:

- the turns under `conversations` or `messages`, each `{from, value}` or `{role, content}`;
- roles `human` / `user` for the question, `gpt` / `assistant` for the answer, alternating,
  and an optional `system` turn first (or a `system` column; the turn wins, as in LLaMA-Factory);
- the image as `image` (a path) or `images` (a list of one path), relative to the image root;
  the `<image>` marker is removed from the question.

Each (question, answer) turn pair becomes one record of the same TFDS dataset `generate`
writes (source "sharegpt"); a question that is one of FairFaceGPT's eight maps to its
attribute, any other (e.g. a follow-up turn) is kept as attribute "other". A system prompt is
not stored (records hold question and answer; training sets its own system message): the
report counts them. A malformed entry or an image path that leaves the root as written is an
error for the whole file (such a file is not to be trusted); a missing or unreadable image, or
a symlink out of the root, skips its entries. A file with nothing usable writes nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

from data_gen import fairface, importer, prompts, tfds_writer
from data_gen.cli import CliError

SOURCE = "sharegpt"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLE = "system"
IMAGE_MARKER = "<image>"


@dataclasses.dataclass(frozen=True)
class Pair:
  entry: int  # index in the JSON list
  image_id: str
  question: str
  answer: str
  system: str | None = None  # the entry's system prompt, if it has one


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
    pairs += _entry_pairs(entry, index, f"{path}: entry {index}")
  if not pairs:
    raise CliError(f"{path}: no question/answer pairs to import ({len(data)} entries)")
  return pairs


def _entry_pairs(entry: object, index: int, where: str) -> list[Pair]:
  if not isinstance(entry, dict):
    raise CliError(f"{where}: expected an object, found {type(entry).__name__}")
  image = _image_of(entry, where)
  if not fairface.safe_relative_path(image):
    raise CliError(f"{where}: image path {image!r} escapes the image root (absolute or `..`)")
  turns = _turns_of(entry, where)
  system = entry.get("system")
  if system is not None and not isinstance(system, str):
    raise CliError(f"{where}: `system` must be a string")
  if turns and turns[0][0] == SYSTEM_ROLE:
    system = turns.pop(0)[1]
  roles = [role for role, _ in turns]
  if (len(turns) % 2 or any(r not in USER_ROLES for r in roles[0::2])
      or any(r not in ASSISTANT_ROLES for r in roles[1::2])):
    raise CliError(f"{where}: expected alternating user/assistant turns (human|user, gpt|assistant"
                   f", an optional system turn first), found {roles}")
  return [Pair(index, image, question.replace(IMAGE_MARKER, "").strip(), answer.strip(),
               system or None)
          for (_, question), (_, answer) in zip(turns[0::2], turns[1::2])]


def _image_of(entry: dict, where: str) -> str:
  if "image" in entry and "images" in entry:
    raise CliError(f"{where}: has both `image` and `images`; expected one")
  image = entry.get("image", entry.get("images"))
  if isinstance(image, list) and len(image) == 1:
    image = image[0]
  if not isinstance(image, str) or not image:
    raise CliError(f"{where}: expected one image path as `image` (a string) or `images` (a list"
                   f" of one), found {image!r}")
  return image


def _turns_of(entry: dict, where: str) -> list[tuple[str, str]]:
  """The (role, text) turns, whichever of LLaMA-Factory's keys the file uses."""
  keys = [k for k in ("conversations", "messages") if k in entry]
  turns = entry[keys[0]] if len(keys) == 1 else None
  if not isinstance(turns, list):
    raise CliError(f"{where}: expected the turns as a list under `conversations` or `messages`"
                   f" (found {'both' if len(keys) > 1 else 'neither'})")
  out = []
  for turn in turns:
    role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
    text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
    if not isinstance(role, str) or not isinstance(text, str):
      raise CliError(f"{where}: each turn must be {{from, value}} or {{role, content}} with string"
                     f" values, found {turn!r:.80}")
    out.append((role, text))
  return out


def import_pairs(pairs: Sequence[Pair], image_root: str, labels: dict[str, dict[str, str]],
                 out: str, seed: int, val_fraction: float,
                 progress: bool = True) -> dict[str, object]:
  """Maps questions to attributes, drops duplicates, writes the dataset and report.json."""
  start = time.time()
  prompt_set = prompts.PromptSet()
  grouped: dict[str, list[tfds_writer.QA]] = {}
  seen: set[tuple[str, str]] = set()
  duplicates = empty = unmatched = 0
  first_entry: dict[str, str] = {}
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
    first_entry.setdefault(pair.image_id, f"entry {pair.entry}")
    grouped.setdefault(pair.image_id, []).append(
        tfds_writer.QA(attribute, pair.question, pair.answer, SOURCE))
  splits, bad = importer.write(grouped, first_entry, image_root, labels, out, seed, val_fraction,
                               "FairFaceGPT, imported from ShareGPT JSON.", progress)
  systems = collections.Counter(p.system for p in pairs if p.system)
  report = {
      "backend": SOURCE, "pairs": len(pairs), "images": len(grouped) - len(bad),
      "written": sum(splits.values()), "splits": splits, "duplicates": duplicates,
      "empty_answers": empty, "unmatched_questions": unmatched, "bad_images": bad,
      "skipped_images": len(bad), "system_prompts": dict(systems.most_common(5)),
      "pairs_with_system_prompt": sum(systems.values()),
      "elapsed_s": round(time.time() - start, 3),
  }
  tfds_writer.write_json(os.path.join(out, "report.json"), report)
  return report


def main(argv: Sequence[str] | None = None) -> int:
  parser = importer.parser("python -m data_gen import-sharegpt", __doc__.split("\n")[0],
                           "a ShareGPT JSON file, e.g. the published FairFaceGPT dataset.json")
  parser.add_argument("--labels", help="FairFace label CSV to fill age/gender/race (optional)")
  try:
    args = parser.parse_args(argv)
    importer.check_args(args)
    pairs = read_pairs(args.source)
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
    print(f"skipped {row['where']} ({row['file']}): {row['reason']}", file=sys.stderr)
  if report["pairs_with_system_prompt"]:
    print(f"note: {report['pairs_with_system_prompt']} pairs came with a system prompt, which the"
          " dataset does not store (training sets its own system message)", file=sys.stderr)
  print(f"wrote {report['written']} QA pairs ({report['splits']}) to {args.out};"
        f" duplicates {report['duplicates']}, skipped images {report['skipped_images']}",
        file=sys.stderr)
  return 0
