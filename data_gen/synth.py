"""Synthetic face world: rendered faces with known labels, in FairFace's layout, and a held-out
multiple-choice benchmark in FaceXBench's JSON format.

`python -m data_gen synth --out DIR --num N --seed S [--benchmark-out DIR2 --benchmark-num M]
[--size 112] [--preview FILE]` writes `DIR/labels.csv` (FairFace's columns, then the ground
truth of every rendered factor) and `DIR/<split>/<n>.jpg`; the benchmark has one JSON per task
and its images under `DIR2/images/<task>/`. Nothing needs a download, so every other part of
the project (generation, training, evaluation, the demo) can run against a world whose truth
is known. How each label looks is documented in `synth_render`.

Determinism: labels come from `(seed, stream)` and each face from `(seed, stream, index)`, so
the same seed gives the same bytes, and the benchmark (its own streams) never shares a face
with the training set.

The benchmark mirrors FaceXBench's files (`synthetic_single_mcq_<task>.json`, the same fields,
categories, prompts and distractor style: neighbouring age bins, "Both"/"None of the above"
for gender) for age, gender, race, expression, attributes (eyeglasses, or facial hair for men
20+), headpose (yaw as left/frontal/right) and one task FaceXBench does not have,
`image_quality` (blur or JPEG quality), which this world can grade because it made the images.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data_gen.cli import CliError, OneLineParser, check_out_dir, check_out_file
from data_gen import fairface
from data_gen.synth_render import (AGE_BINS, EXPRESSIONS, FACTOR_VALUES, GENDERS, HEAD_POSES,
                                   RACES, check_labels, encode_jpeg, render_face)
from facellm_jax.input import image as image_lib

__all__ = ["CSV_COLUMNS", "VOCAB", "BENCHMARK_TASKS", "sample_labels", "face_rng", "render_face",
           "render_jpeg", "missing_columns", "known_faces", "write_dataset", "write_benchmark",
           "write_preview", "main"]

FAIRFACE_COLUMNS = ("file", "age", "gender", "race", "service_test")
EXTRA_COLUMNS = ("expression", "head_pose", "roll", "eyes", "eyeglasses", "facial_hair",
                 "hair_length", "hair_color", "lighting", "brightness", "sharpness",
                 "jpeg_quality", "background")
CSV_COLUMNS = FAIRFACE_COLUMNS + EXTRA_COLUMNS
ROLL_RANGE = (-10, 10)  # integer degrees, positive = counter-clockwise in the image
VOCAB: dict[str, tuple[str, ...]] = {**FACTOR_VALUES, "service_test": ("True", "False")}
# Drawn independently and exactly balanced; facial_hair and hair_color depend on age/gender.
_INDEPENDENT = ("age", "gender", "race", "service_test", "expression", "head_pose", "eyes",
                "eyeglasses", "hair_length", "lighting", "brightness", "sharpness",
                "jpeg_quality", "background")
_GREY_FROM = AGE_BINS.index("60-69")
_BEARD_FROM = AGE_BINS.index("20-29")


def _stream_id(stream: str) -> int:
  return zlib.crc32(stream.encode())


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  """n draws from range(k) whose counts differ by at most one, in random order."""
  return rng.permutation(np.arange(n) % k)


def sample_labels(n: int, seed: int, stream: str = "train") -> list[dict[str, str | int]]:
  """Labels for n faces, balanced per factor (exactly, up to one, within their population).

  facial_hair is drawn only for men aged 20+ (others: "none") and hair_color is "grey" exactly
  from 60-69 on; both are balanced over the faces they can vary on.
  """
  rng = np.random.default_rng([seed, _stream_id(stream)])
  cols = {name: np.asarray(VOCAB[name])[_balanced(rng, n, len(VOCAB[name]))]
          for name in _INDEPENDENT}
  rolls = ROLL_RANGE[0] + _balanced(rng, n, ROLL_RANGE[1] - ROLL_RANGE[0] + 1)
  age_idx = np.array([AGE_BINS.index(a) for a in cols["age"]], dtype=int)
  hair = np.full(n, "grey", dtype=object)
  young = np.flatnonzero(age_idx < _GREY_FROM)
  colors = [c for c in VOCAB["hair_color"] if c != "grey"]
  hair[young] = np.asarray(colors)[_balanced(rng, len(young), len(colors))]
  beard = np.full(n, "none", dtype=object)
  can = np.flatnonzero((cols["gender"] == "Male") & (age_idx >= _BEARD_FROM))
  beard[can] = np.asarray(VOCAB["facial_hair"])[_balanced(rng, len(can), 3)]
  rows = []
  for i in range(n):
    row = {name: str(cols[name][i]) for name in _INDEPENDENT}
    row.update(roll=int(rolls[i]), hair_color=hair[i], facial_hair=beard[i])
    rows.append({c: row[c] for c in CSV_COLUMNS if c != "file"})
  return rows


def face_rng(seed: int, stream: str, index: int) -> np.random.Generator:
  """The nuisance-jitter generator of one face, independent of every other face."""
  return np.random.default_rng([seed, _stream_id(stream), index])


def render_jpeg(labels: Mapping[str, object], size: int, rng: np.random.Generator) -> bytes:
  """The face's file bytes: rendered, then JPEG-encoded at its `jpeg_quality` label."""
  return encode_jpeg(render_face(labels, size, rng), str(labels["jpeg_quality"]))


def missing_columns(labels: Mapping[str, object]) -> list[str]:
  """The synthetic world's label columns a face's labels lack (a real FairFace CSV lacks the
  extra ones); items built from the ground truth need them all."""
  return [c for c in CSV_COLUMNS if c != "file" and c not in labels]


def known_faces(faces: Sequence[fairface.Face]) -> tuple[list[fairface.Face], list[fairface.BadRow]]:
  """The faces whose every label is in this world's vocabularies, and the others as bad rows
  naming each unknown value. Items built from the ground truth (MCQ, cards) skip those rows,
  as the label reader skips its bad rows, instead of failing on, or inventing, an option."""
  good, bad = [], []
  for face in faces:
    try:
      check_labels(face.labels)
      good.append(face)
    except ValueError as e:
      bad.append(fairface.BadRow(face.line, face.image_id, str(e)))
  return good, bad


def write_dataset(out_dir: str | Path, num: int, seed: int, size: int = 112,
                  split: str = "train") -> Path:
  """Writes `out_dir/<split>/<1..num>.jpg` and `out_dir/labels.csv`; returns the CSV path."""
  out_dir = Path(out_dir)
  (out_dir / split).mkdir(parents=True, exist_ok=True)
  rows = sample_labels(num, seed, stream=split)
  for i, row in enumerate(tqdm(rows, desc=f"synth {split}", unit="face")):
    rel = f"{split}/{i + 1}.jpg"
    (out_dir / rel).write_bytes(render_jpeg(row, size, face_rng(seed, split, i)))
    row["file"] = rel
  csv_path = out_dir / "labels.csv"
  with open(csv_path, "w", newline="", encoding="utf-8") as fh:
    writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return csv_path


# ----------------------------------------------------------------------------- benchmark
_POSTPEND = ("Please answer the question and provide only the correct option letter, "
             "e.g., A, B, C, D.")
_NOTA = "None of the above"
_UNSURE = "Cannot be determined"

BENCHMARK_TASKS = {
    # task: (category, sub-category, prepend_text, question templates)
    "age": ("bias_fairness", "age",
            "Age estimation involves predicting the age of a person based on their facial "
            "features in an image. For this task, we define the following age groups: 0-2, 3-9, "
            "10-19, 20-29, 30-39, 40-49, 50-59, 60-69, and more than 70 years. You have to "
            "perform the task of age estimation.",
            ("Estimate the age group of the person in this image.",
             "Select the age group that best describes the person in this image.",
             "What is the most appropriate age group for the person in this image?",
             "Approximately how old is the person in this image?")),
    "gender": ("bias_fairness", "gender",
               "Gender prediction involves determining the gender of a person based on their "
               "facial features in an image. You have to perform the task of gender prediction.",
               ("Which gender category best describes the person in this image?",
                "Determine the gender of the person shown in this image.",
                "What is the gender of the person in this image?",
                "Identify the gender of the person in this image.")),
    "race": ("bias_fairness", "race",
             "Race prediction involves determining the race or ethnicity of a person based on "
             "their facial features in an image. The possible race groups are White, Black, East "
             "Asian, Southeast Asian, Middle Eastern, Indian, Latino_Hispanic, and Other. You have "
             "to perform the task of race prediction.",
             ("Identify the race of the person in this image.",
              "Select the most appropriate race for the person in this image.",
              "Which race category best describes the person in this image?",
              "What is the race of the person in this image?")),
    "expression": ("attributes_expression", "expression",
                   "Facial expression recognition involves identifying the emotional state of a "
                   "person based on their facial expressions in an image. You have to perform the "
                   "task of facial expression recognition.",
                   ("Identify the primary expression shown by the person in the image.",
                    "Which expression is the person showing in the image?",
                    "What is the main expression of the person in the image?")),
    "attributes": ("attributes_expression", "attributes",
                   "Face attributes recognition involves identifying specific characteristics of "
                   "a person, such as beard, moustache, and eyeglasses, based on their facial "
                   "appearance in an image. You have to perform the task of face attributes "
                   "recognition.",
                   ("Is the person in this image wearing eyeglasses?",
                    "What facial hair does the person in this image have?")),
    "headpose": ("face_localization", "headpose",
                 "Headpose estimation involves predicting the orientation of a person's head in "
                 "an image. For this task, the yaw is divided into: left (the face is turned "
                 "towards the left side of the image), frontal, and right (turned towards the "
                 "right side of the image). You have to perform the task of headpose estimation.",
                 ("In which direction is the head of the person in this image turned?",
                  "What is the yaw direction of the headpose of the person in this image?")),
    # Not a FaceXBench task: the synthetic world's blur and JPEG labels, scored like the rest.
    "image_quality": ("image_quality", "image_quality",
                      "Image quality assessment involves judging degradations of a face image "
                      "such as blur and JPEG compression artifacts. You have to perform the task "
                      "of image quality assessment.",
                      ("Is this image sharp or blurry?",
                       "Is the JPEG quality of this image high or low?")),
}


def _question(task: str, row: Mapping[str, object], rng: np.random.Generator):
  """(question_text, answer, distractors) for one face; distractors never match the face."""
  templates = BENCHMARK_TASKS[task][3]
  text = templates[rng.integers(len(templates))]
  if task == "age":
    i = AGE_BINS.index(str(row["age"]))
    near = sorted((j for j in range(len(AGE_BINS)) if j != i),
                  key=lambda j: (abs(j - i), rng.random()))
    wrong = [AGE_BINS[j] for j in near[:3]]
    if rng.random() < 0.25:
      wrong[2] = _NOTA
    return text, str(row["age"]), wrong
  if task == "gender":
    other = GENDERS[1 - GENDERS.index(str(row["gender"]))]
    return text, str(row["gender"]), [other, "Both", _NOTA]
  if task == "race":
    wrong = [str(r) for r in rng.permutation([r for r in RACES if r != row["race"]])[:3]]
    if rng.random() < 0.3:
      wrong[2] = str(rng.choice([_NOTA, "Other"]))
    return text, str(row["race"]), wrong
  if task == "expression":
    wrong = [str(e) for e in rng.permutation([e for e in EXPRESSIONS if e != row["expression"]])]
    return text, str(row["expression"]), wrong[:3]
  if task == "headpose":
    return text, str(row["head_pose"]), [p for p in HEAD_POSES if p != row["head_pose"]] + [_NOTA]
  if task == "attributes":
    # Facial hair only where it can vary (men 20+), eyeglasses elsewhere.
    if row["facial_hair"] != "none" or (row["gender"] == "Male"
                                        and AGE_BINS.index(str(row["age"])) >= _BEARD_FROM):
      names = {"none": "No facial hair", "beard": "Beard", "moustache": "Moustache"}
      answer = names[str(row["facial_hair"])]
      return templates[1], answer, [v for v in names.values() if v != answer] + [_UNSURE]
    answer = "Yes" if row["eyeglasses"] == "yes" else "No"
    return templates[0], answer, [{"Yes": "No", "No": "Yes"}[answer], _UNSURE, _NOTA]
  if task == "image_quality":
    if rng.random() < 0.5:
      return templates[0], str(row["sharpness"]), [
          {"sharp": "blurry", "blurry": "sharp"}[str(row["sharpness"])], _UNSURE, _NOTA]
    return templates[1], str(row["jpeg_quality"]), [
        {"high": "low", "low": "high"}[str(row["jpeg_quality"])], _UNSURE, _NOTA]
  raise ValueError(f"unknown benchmark task {task!r}; expected one of {list(BENCHMARK_TASKS)}")


def write_benchmark(out_dir: str | Path, num: int, seed: int, size: int = 112) -> list[Path]:
  """Writes `num` questions per task (each on its own held-out face); returns the JSON paths."""
  out_dir = Path(out_dir)
  paths = []
  for task, (category, sub, prepend, _) in BENCHMARK_TASKS.items():
    name = f"synthetic_single_mcq_{task}"
    stream = f"benchmark/{task}"
    (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _stream_id(stream + "/options")])
    questions = {}
    rows = sample_labels(num, seed, stream=stream)
    for i, row in enumerate(tqdm(rows, desc=f"benchmark {task}", unit="face")):
      rel = f"images/{name}/question_{i + 1}.jpg"
      (out_dir / rel).write_bytes(render_jpeg(row, size, face_rng(seed, stream, i)))
      text, answer, wrong = _question(task, row, rng)
      options = [str(o) for o in rng.permutation([answer, *wrong])]
      questions[str(i + 1)] = {
          "image_paths": [rel],
          "question_text": text,
          "options": options,
          "correct_answer_option": "ABCD"[options.index(answer)],
          "answer": answer,
      }
    doc = {"category": category, "sub-category": sub, "dataset": "synthetic",
           "question_type": "MCQ", "num_images": "single", "prepend_text": prepend,
           "postpend_text": _POSTPEND, "questions": questions}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=4) + "\n", encoding="utf-8")
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------- preview
def _caption(row: Mapping[str, object]) -> list[str]:
  age = "70+" if row["age"] == "more than 70" else row["age"]
  return [f"{age} {row['gender']}", str(row["race"]), f"{row['expression']}, {row['head_pose']}"]


def write_preview(csv_path: str | Path, out_path: str | Path, cols: int = 8, rows: int = 4) -> Path:
  """A captioned contact sheet of the first faces of a dataset, as a small palette PNG."""
  csv_path = Path(csv_path)
  with open(csv_path, newline="", encoding="utf-8") as fh:
    entries = list(csv.DictReader(fh))[:cols * rows]
  if not entries:
    raise ValueError(f"{csv_path} has no faces to preview.")
  font = ImageFont.load_default(size=10)
  with Image.open(csv_path.parent / entries[0]["file"]) as first:
    tile = first.width
  line_h, pad = 11, 4
  cell_h = tile + 3 * line_h + pad
  rows = -(-len(entries) // cols)
  sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * cell_h + pad), (250, 250, 250))
  draw = ImageDraw.Draw(sheet)
  for k, row in enumerate(entries):
    x, y = pad + (k % cols) * (tile + pad), pad + (k // cols) * cell_h
    with Image.open(csv_path.parent / row["file"]) as face:
      sheet.paste(image_lib.rgb_image(face).resize((tile, tile)), (x, y))
    for j, line in enumerate(_caption(row)):
      draw.text((x, y + tile + j * line_h), line, fill=(20, 20, 20), font=font)
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out_path, optimize=True)
  return out_path


# ----------------------------------------------------------------------------- CLI
def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = OneLineParser(prog="python -m data_gen synth",
                    description="Render synthetic faces with ground truth (FairFace layout) and an "
                                "optional held-out FaceXBench-style benchmark.")
  p.add_argument("--out", required=True, type=Path, help="dataset folder (labels.csv, train/)")
  p.add_argument("--num", required=True, type=int, help="number of faces in the dataset")
  p.add_argument("--seed", required=True, type=int, help="same seed, same bytes (>= 0)")
  p.add_argument("--split", default="train", help="image subfolder and `file` prefix")
  p.add_argument("--benchmark-out", type=Path, help="folder for the held-out benchmark")
  p.add_argument("--benchmark-num", type=int, help="questions per benchmark task (default 50)")
  p.add_argument("--size", type=int, default=112, help="image side in pixels (32..1024)")
  p.add_argument("--preview", type=Path, help="write a contact sheet PNG of the first faces")
  args = p.parse_args(argv)
  if args.num < 1:
    raise CliError(f"--num must be at least 1, got {args.num}")
  if args.seed < 0:
    raise CliError(f"--seed must be a non-negative integer (numpy seeds are), got {args.seed}")
  if not 32 <= args.size <= 1024:
    raise CliError(f"--size must be between 32 and 1024 pixels, got {args.size}")
  if not args.split or not args.split.replace("_", "").replace("-", "").isalnum():
    raise CliError(f"--split must be a plain folder name like 'train', got {args.split!r}")
  if args.benchmark_num is not None and args.benchmark_out is None:
    raise CliError("--benchmark-num needs --benchmark-out DIR2")
  if args.benchmark_out is not None:
    args.benchmark_num = 50 if args.benchmark_num is None else args.benchmark_num
    if args.benchmark_num < 1:
      raise CliError(f"--benchmark-num must be at least 1, got {args.benchmark_num}")
    if args.benchmark_out.resolve() == args.out.resolve():
      raise CliError("--benchmark-out must differ from --out (the benchmark is held out)")
  for flag, path in (("--out", args.out), ("--benchmark-out", args.benchmark_out)):
    if path is not None:
      check_out_dir(str(path), flag)
  if args.preview is not None:
    if args.preview.suffix.lower() != ".png":
      raise CliError(f"--preview must be a .png file, got {args.preview}")
    check_out_file(str(args.preview), "--preview")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = _parse(argv)
  except CliError as e:
    print(f"synth: error: {e}", file=sys.stderr)
    return 2
  try:
    csv_path = write_dataset(args.out, args.num, args.seed, args.size, args.split)
    print(f"wrote {args.num} faces and {csv_path}")
    if args.benchmark_out is not None:
      paths = write_benchmark(args.benchmark_out, args.benchmark_num, args.seed, args.size)
      print(f"wrote {len(paths)} benchmark tasks x {args.benchmark_num} questions to "
            f"{args.benchmark_out}")
    if args.preview is not None:
      print(f"wrote {write_preview(csv_path, args.preview)}")
  except OSError as e:
    print(f"synth: error: cannot write output: {e}", file=sys.stderr)
    return 1
  return 0
