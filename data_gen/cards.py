"""Attribute cards: one dense caption per synthetic face, for the demo's pretraining stage.

A from-scratch vision tower learns to read a face only from targets that depend on the face. In
an MCQ or a free-text answer most target tokens are predictable from the text alone (the format,
the letter lookup, the phrasing), and a tiny model trained on them from scratch learns the text
first and the face late: measured on the demo's benchmark, 1,500 steps of QA + MCQ left gender,
expression and head pose at chance. A card states every benchmark factor in one short line, in
the benchmark's own option words, in a fixed order and nothing else:

  "happy sharp high 20-29 Female Black frontal No No facial hair."

(expression, sharpness, JPEG quality, age, gender, race, head pose, eyeglasses, facial hair), so
each example supervises all of them. The order names each slot, so no word is spent on it: with
"Age ...; head pose ...; eyeglasses ...; JPEG quality ..." and separators a card row was 51 tokens
of the demo's tokenizer, now 36 (at most 37), and a pretraining step costs what its tokens cost.
The order itself matters: a decoder learning to read the one image token learns the slots nearest
the image first (from the demo's vision checkpoint, after 150 steps: expression 0.20 of training
faces right in slot 4, 0.78 in slot 1), so the factors it read last come first. The cards stand
in for the pretraining an InternVL checkpoint already has; the FaceLLM stage (QA + MCQ) then
starts from that checkpoint, as the paper's starts from InternVL3.

`python -m data_gen cards --labels CSV --images ROOT --out OUT` writes a TFDS dataset (the
`generate` format, attribute `card`), one record per face.
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

from tqdm import tqdm

from data_gen import fairface, synth, tfds_writer
from data_gen.cli import CliError, OneLineParser, check_out_dir

ATTRIBUTE = "card"
QUESTION = "List the attributes of this face."
SOURCE = "card"
# The MCQ option words (data_gen.synth._question) for the label values that differ from them.
_FACIAL_HAIR = {"none": "No facial hair", "beard": "Beard", "moustache": "Moustache"}
_YES_NO = {"yes": "Yes", "no": "No"}


def card(labels: Mapping[str, str]) -> str:
  """The caption of one face: every benchmark factor, in a fixed order."""
  try:
    return (f"{labels['expression']} {labels['sharpness']} {labels['jpeg_quality']} "
            f"{labels['age']} {labels['gender']} {labels['race']} {labels['head_pose']} "
            f"{_YES_NO[labels['eyeglasses']]} {_FACIAL_HAIR[labels['facial_hair']]}.")
  except KeyError as e:
    raise ValueError(f"a card needs the synthetic world's labels; {e} is missing or unknown "
                     f"(write the faces with `python -m data_gen synth`)") from None


def write_dataset(faces: Sequence[fairface.Face], out_dir: str, *, progress: bool = True) -> int:
  """Writes one card per face as a TFDS dataset (all `train`); returns the record count."""
  items = [tfds_writer.ImageQA(f.image_id, f.path, f.labels,
                               [tfds_writer.QA(ATTRIBUTE, QUESTION, card(f.labels), SOURCE)])
           for f in tqdm(faces, desc="cards", unit="face", disable=not progress)]
  tfds_writer.write_dataset(out_dir, items, {i.image_id: "train" for i in items},
                            description="Synthetic-face attribute cards (demo pretraining).")
  return len(items)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = OneLineParser(prog="python -m data_gen cards", description=__doc__.split("\n")[0])
  p.add_argument("--labels", required=True, help="label CSV with the synthetic world's columns")
  p.add_argument("--images", required=True, help="image root; the CSV's `file` is relative")
  p.add_argument("--out", required=True, help="output TFDS dataset directory")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  try:
    args = _parse(sys.argv[1:] if argv is None else argv)
    check_out_dir(args.out)
    faces, bad = fairface.read_labels(args.labels, args.images, progress=not args.no_progress)
    if not faces:
      raise CliError(f"{args.labels}: no usable images ({len(bad)} bad rows)")
    lacking = synth.missing_columns(faces[0].labels)
    if lacking:
      raise CliError(f"{args.labels}: cards need the synthetic world's label columns; missing "
                     f"{','.join(lacking)} (write the faces with `python -m data_gen synth`)")
    faces, unknown = synth.known_faces(faces)  # a label value a card cannot name: a bad row
    bad += unknown
    if not faces:
      raise CliError(f"{args.labels}: no usable images ({len(bad)} bad rows)")
    count = write_dataset(faces, args.out, progress=not args.no_progress)
  except (CliError, fairface.LabelsError, ValueError, FileNotFoundError) as e:
    print(f"cards: error: {e}", file=sys.stderr)
    return 2
  for row in bad:
    print(row.skipped(args.labels), file=sys.stderr)
  print(f"wrote {count} cards to {args.out}", file=sys.stderr)
  return 0
