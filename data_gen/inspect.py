"""`python -m data_gen inspect OUT`: what a generated (or imported) dataset holds.

Reads through TFDS exactly as training will, but skips image decoding, so it is quick even on
the full 87,632 pairs: per split, the records, images, attributes, sources, label balance and
answer lengths, a few sample pairs, and the run's report.json.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import textwrap
from typing import Sequence

import tensorflow_datasets as tfds

from data_gen.cli import CliError, OneLineParser


def summarize(out: str, samples: int = 2) -> dict[str, object]:
  """Counts per split; raises CliError if `out` holds no dataset or a damaged one."""
  if samples < 0:
    raise CliError(f"--samples must be >= 0, got {samples}")
  if not os.path.isfile(os.path.join(out, "dataset_info.json")):
    raise CliError(f"{out} holds no dataset (no dataset_info.json); run `generate` first")
  try:
    builder = tfds.builder_from_directory(out)
  except Exception as e:  # pylint: disable=broad-except  (TFDS raises many kinds here)
    raise _damaged(out, "its dataset_info.json or features.json cannot be read", e) from e
  summary = {"splits": {}}
  for split, info in builder.info.splits.items():
    try:
      source = builder.as_data_source(split=split,
                                      decoders={"image": tfds.decode.SkipDecoding()})
      records = [_text(source[i]) for i in range(len(source))]
    except Exception as e:  # pylint: disable=broad-except  (array_record raises RuntimeError)
      shards = ", ".join(os.path.relpath(str(p), out) for p in info.filepaths)
      raise _damaged(out, f"its {split} split cannot be read (shards {shards})", e) from e
    per_image = {r["image_id"]: r for r in records}.values()
    words = [len(r["answer"].split()) for r in records] or [0]
    summary["splits"][split] = {
        "records": len(records), "images": len(per_image),
        "attributes": dict(collections.Counter(r["attribute"] for r in records)),
        "sources": dict(collections.Counter(r["source"] for r in records)),
        "gender": dict(collections.Counter(r["gender"] for r in per_image)),
        "race": dict(collections.Counter(r["race"] for r in per_image)),
        "age": dict(collections.Counter(r["age"] for r in per_image)),
        "answer_words": {"min": min(words), "mean": round(statistics.fmean(words), 1),
                         "max": max(words)},
        "samples": [{k: r[k] for k in ("image_id", "attribute", "question", "answer")}
                    for r in records[:samples]],
    }
  report_path = os.path.join(out, "report.json")
  if os.path.isfile(report_path):
    with open(report_path, encoding="utf-8") as f:
      summary["report"] = json.load(f)
  return summary


def _damaged(out: str, what: str, error: Exception) -> CliError:
  lines = str(error).strip().splitlines()
  return CliError(f"{out}: {what}: {type(error).__name__}: {lines[0] if lines else ''}; the dataset"
                  " is damaged or incomplete: rerun the command that wrote it (`generate` with the"
                  " same --out rebuilds it from its journal; the others need a new --out)")


def _text(record: dict[str, object]) -> dict[str, str]:
  return {k: v.decode("utf-8") for k, v in record.items() if k != "image"}


def _print(summary: dict[str, object]) -> None:
  for split, s in summary["splits"].items():
    print(f"{split}: {s['records']} QA pairs over {s['images']} images")
    for key in ("attributes", "sources", "gender", "race", "age"):
      print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in sorted(s[key].items())))
    w = s["answer_words"]
    print(f"  answer words: min {w['min']}, mean {w['mean']}, max {w['max']}")
    for sample in s["samples"]:
      print(f"  [{sample['image_id']} / {sample['attribute']}] Q: {sample['question']}")
      print(textwrap.indent(textwrap.fill(sample["answer"], 96), "    A: "))
  report = summary.get("report")
  if report:
    keys = ("requested", "written", "refused", "failed", "skipped_rows", "skipped_images",
            "prompt_tokens", "completion_tokens", "estimated_cost_usd", "elapsed_s")
    print("report: " + ", ".join(f"{k}={report[k]}" for k in keys if k in report))


def main(argv: Sequence[str] | None = None) -> int:
  parser = OneLineParser(prog="python -m data_gen inspect", description=__doc__.split("\n")[0])
  parser.add_argument("out", help="dataset directory written by generate or import-sharegpt")
  parser.add_argument("--samples", type=int, default=2, help="sample QA pairs per split (>= 0)")
  parser.add_argument("--json", action="store_true", help="print the summary as JSON")
  try:
    args = parser.parse_args(argv)
    summary = summarize(args.out, args.samples)
  except CliError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    if args.json:
      print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
      _print(summary)
    sys.stdout.flush()
  except BrokenPipeError:  # `inspect OUT | head`: the reader has all it wanted
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0
