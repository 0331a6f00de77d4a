"""What the importers share: their command-line options, the image checks and the dataset write.

`import-sharegpt` and `import-raw` turn QA that someone else generated into the same TFDS
dataset `generate` writes. Both check every image through `fairface.image_problem` (inside the
root, symlinks resolved, decodable), skip and report the unusable ones, and refuse to write
anything when nothing usable is left: an empty dataset is not a result.
"""

from __future__ import annotations

import argparse
import os
from typing import Mapping, Sequence

import tqdm

from data_gen import fairface, tfds_writer
from data_gen.cli import CliError, OneLineParser, check_out_dir


def parser(prog: str, description: str, source_help: str) -> OneLineParser:
  p = OneLineParser(prog=prog, description=description)
  p.add_argument("source", help=source_help)
  p.add_argument("--images", required=True, help="FairFace image root (the `file` paths' root)")
  p.add_argument("--out", required=True, help="output TFDS dataset directory (new or empty)")
  p.add_argument("--seed", type=int, default=0, help="train/validation split seed")
  p.add_argument("--val-fraction", type=float, default=0.0,
                 help="share of images (not QA pairs) in the validation split")
  p.add_argument("--no-progress", action="store_true")
  return p


def check_args(args: argparse.Namespace) -> None:
  """The checks every importer makes before it reads its source (nothing is written)."""
  if not 0.0 <= args.val_fraction < 1.0:
    raise CliError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
  if not os.path.isdir(args.images):
    raise CliError(f"image root is not a directory: {args.images}")
  check_out_dir(args.out)


def write(qa: Mapping[str, Sequence[tfds_writer.QA]], found_in: Mapping[str, str],
          image_root: str, labels: Mapping[str, Mapping[str, str]], out: str, seed: int,
          val_fraction: float, description: str,
          progress: bool = True) -> tuple[dict[str, int], list[dict[str, str]]]:
  """Writes the QA of every usable image; returns the records per split and the skipped images
  (`{"where": found_in[image_id], "file": image_id, "reason": ...}`).

  Raises CliError, with nothing written, when no image is usable.
  """
  root = os.path.abspath(image_root)
  items, bad = [], []
  for image_id, pairs in tqdm.tqdm(qa.items(), desc="checking images", unit="img",
                                   disable=not progress, leave=False):
    reason = fairface.image_problem(root, image_id)
    if reason:
      bad.append({"where": found_in[image_id], "file": image_id, "reason": reason})
    else:
      items.append(tfds_writer.ImageQA(image_id, os.path.join(root, image_id),
                                       labels.get(image_id, {}), pairs))
  if not items:
    first = f"; first: {bad[0]['file']}: {bad[0]['reason']}" if bad else ""
    raise CliError(f"nothing to import: {len(qa)} image(s) with QA, none usable{first}")
  split_of = tfds_writer.assign_splits([i.image_id for i in items], seed, val_fraction)
  return tfds_writer.write_dataset(out, items, split_of, description=description), bad
