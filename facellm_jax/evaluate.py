"""Entry point: `python -m facellm_jax.evaluate --workdir=W --facexbench=DIR --out=report.json`.

Scores a trained model (or, with `--hf DIR`, a HF InternVL checkpoint) on a FaceXBench-format
folder with the benchmark's own prompt and answer extraction (`evaluation/facexbench.py`).
Writes `--out` (total_questions, overall, per_category, per_task, single_vs_multiple,
unanswered, plus what was evaluated) and `predictions.jsonl` beside it, one line per question
as answered. A rerun with the same `--out` skips answered questions; the folder remembers which
model, step, benchmark and settings its predictions came from and refuses to mix in another's.
Use one `--out` folder per model.

`--fairness_labels CSV` (FairFace columns `file,age,gender,race`, `file` relative to the CSV)
adds `fairness.json` and `fairness.png` beside the report: accuracy of the age / gender / race
questions per group for the questions whose single image is a labelled face.

The defaults are the reference's FaceXBench run (idiap/facellm `vlmeval/vlm/facellm.py`): the HF
processor's image preprocessing, i.e. dynamic tiling on (GotOcr2 `crop_to_patches`, 1 to 12 tiles
plus a thumbnail), up to 2,048 new tokens, and a user turn only (no system message: the
InternVL-hf chat template adds none). `--fast` is one tile per image and 32 new tokens (enough
for an option letter); an explicit `--max_tiles` / `--max_new_tokens` overrides either. The
report records the settings used and which preset they came from.

The model runs on `--mesh data=D,fsdp=F,tensor=T` (default: every local device, tensor parallel
as wide as the heads divide, data over the rest; see `inference/load.py`); `--batch_size` rows
split over data x fsdp. Several processes (one per host, started like multi-host training with
`--coordinator_address/--num_processes/--process_id` or `--distributed`) each answer their own
`--batch_size` questions of every global batch on their own replica, and process 0 writes the
one report (`inference/hosts.py`); a rerun resumes from process 0's predictions.

`--compile_only --config=configs/internvl3_38b.py --topology=v5p-8 [--batch_size 16] [--cache_len
4096]` compiles the prefill and decode steps for a TPU slice instead and prints their bytes per
chip as one JSON line (`inference/compile_only.py`).

`--workdir` and `--out` may be `gs://` URLs (the benchmark and the labels are local files). Bad
input (a folder with no JSON, a missing image, a workdir without a checkpoint, a `--step` it does
not have, an `--out` that cannot be written, ...) is a one-line error and exit code 2, found
before anything is written and before any model time is spent.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import jax

from facellm_jax import host_memory, paths
from facellm_jax.evaluation import facexbench, fairness
from facellm_jax.inference import answer, compile_only, hosts, load

RUN_FILE = "evaluation_run.json"
# vlmeval/vlm/facellm.py: generate(max_tokens=2048) through AutoProcessor (InternVLProcessor's
# images_kwargs default crop_to_patches=True, GotOcr2's min_patches 1 / max_patches 12).
REFERENCE = {"max_new_tokens": 2048, "max_tiles": 12}
FAST = {"max_new_tokens": 32, "max_tiles": 1}


def _parser() -> load.ArgumentParser:
  parser = load.ArgumentParser(prog="python -m facellm_jax.evaluate", description=__doc__.split("\n\n")[1])
  load.add_model_args(parser)
  parser.add_argument("--facexbench", required=True, help="folder of FaceXBench *.json files and their images")
  parser.add_argument("--out", required=True, help="report JSON path (or gs:// URL); predictions.jsonl goes beside it")
  parser.add_argument("--prepend_text", action="store_true", help="put each file's prepend_text before the question")
  parser.add_argument("--batch_size", type=int, default=8, help="questions per generation call")
  parser.add_argument("--max_new_tokens", type=int, default=None,
                      help=f"answer length limit in tokens (default {REFERENCE['max_new_tokens']}, "
                           f"{FAST['max_new_tokens']} with --fast)")
  parser.add_argument("--max_tiles", type=int, default=None,
                      help=f"InternVL dynamic tiling: at most this many tiles + a thumbnail per image, 1 = off "
                           f"(default {REFERENCE['max_tiles']}, {FAST['max_tiles']} with --fast)")
  parser.add_argument("--fast", action="store_true",
                      help="one tile per image and short answers instead of the reference's settings")
  parser.add_argument("--system_prompt", default=None, help="system message before each question (default: none)")
  parser.add_argument("--fairness_labels", help="FairFace-format labels.csv of the benchmark's face images")
  hosts.add_args(parser)
  return parser


def read_face_labels(csv_path: str | Path) -> dict[Path, dict[str, str]]:
  """Resolved image path -> {age, gender, race} from a FairFace-format labels CSV."""
  csv_path = Path(csv_path)
  if not csv_path.is_file():
    raise FileNotFoundError(f"fairness labels file {csv_path} not found; expected a CSV with columns "
                            "file,age,gender,race")
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = {"file", "age", "gender", "race"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
    return {(csv_path.parent / row["file"]).resolve(): {k: row[k] for k in ("age", "gender", "race")}
            for row in reader}


def _check_run(out_dir: paths.Path, run: dict) -> None:
  """Predictions already in `out_dir` must come from this same model, step, benchmark and settings."""
  run_file = out_dir / RUN_FILE
  if (out_dir / "predictions.jsonl").exists() and run_file.exists():
    found = json.loads(run_file.read_text())
    if found != run:
      diff = ", ".join(f"{k}: {found.get(k)!r} there, {run.get(k)!r} now"
                       for k in sorted(set(found) | set(run)) if found.get(k) != run.get(k))
      raise ValueError(f"{out_dir}/predictions.jsonl holds answers of another evaluation ({diff}); "
                       "use another --out folder, or delete that file to start over")


def run(args) -> dict:
  """The evaluation behind the CLI; returns the report. Everything is checked before the first write."""
  preset = FAST if args.fast else REFERENCE
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_tiles < 1:
    raise ValueError("--batch_size, --max_new_tokens and --max_tiles must be >= 1")
  questions = facexbench.load_benchmark(args.facexbench)
  labels = read_face_labels(args.fairness_labels) if args.fairness_labels else None
  out = paths.path(args.out)
  out_dir = paths.check_output_dir(out.parent, "--out")
  if out.is_dir():
    raise ValueError(f"--out {out} is a folder; expected the report's file path, e.g. {out / 'report.json'}")
  if args.workdir:
    model_id = {"workdir": str(paths.path(args.workdir)), "step": load.check_step(args.workdir, args.step)}
  else:
    model_id = {"hf": str(paths.path(args.hf))}
  run_info = {"model": model_id, "facexbench": str(Path(args.facexbench).resolve()),
              "prepend_text": args.prepend_text, "max_new_tokens": args.max_new_tokens,
              "max_tiles": args.max_tiles, "system_prompt": args.system_prompt, "dtype": args.dtype}
  writer = hosts.is_writer()
  if writer:
    _check_run(out_dir, run_info)
  generate_fn = None
  answered = facexbench.answered(out_dir) if writer else {}
  pending = hosts.broadcast_mask([q.qid not in answered for q in questions])  # process 0's view
  if pending.any():  # a finished run needs no model
    loaded = load.load_model(args)
    if args.workdir and loaded.step != model_id["step"]:  # a damaged newest step (or a newer save) was met
      model_id["step"] = loaded.step
      if writer:
        _check_run(out_dir, run_info)
    generate_fn = hosts.sliced(answer.make_generate_fn(
        loaded.model, loaded.config, loaded.tokenizer, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, max_tiles=args.max_tiles, system_prompt=args.system_prompt), args.batch_size)
  batch_size = args.batch_size * jax.process_count()  # each process answers its batch_size of every batch
  if not writer:
    facexbench.evaluate([q for q, p in zip(questions, pending) if p], generate_fn, out_dir,
                        batch_size=batch_size, prepend=args.prepend_text, write=False)
    return {}
  paths.makedirs(out_dir)
  paths.write_json(out_dir / RUN_FILE, run_info)

  report = facexbench.evaluate(questions, generate_fn, out_dir, batch_size=batch_size, prepend=args.prepend_text)
  report.update(run_info, preset="fast" if args.fast else "reference")
  paths.write_json(out, report)
  if out.name != "report.json":  # `evaluate` always writes one there; --out is the report.
    (out_dir / "report.json").unlink(missing_ok=True)
  if labels is not None:
    qid_labels = {q.qid: labels[q.image_paths[0]] for q in questions
                  if len(q.image_paths) == 1 and q.image_paths[0] in labels}
    report["fairness"] = _fairness(out_dir, qid_labels, args.fairness_labels)
    paths.write_json(out, report)
  return report


def _fairness(out_dir: paths.Path, qid_labels: dict, labels_file: str) -> dict:
  """fairness.json and fairness.png beside the report (made locally, then copied when remote)."""
  with tempfile.TemporaryDirectory(prefix="facellm-fairness-") as tmp:
    local = Path(tmp) if paths.is_remote(out_dir) else Path(out_dir)
    if paths.is_remote(out_dir):
      (local / "predictions.jsonl").write_bytes((out_dir / "predictions.jsonl").read_bytes())
    records = fairness.records_from_predictions(local / "predictions.jsonl", qid_labels)
    if not records:
      raise ValueError(f"no age/gender/race question has a single image listed in {labels_file}; "
                       "the CSV's file column must name the benchmark's image files")
    report = fairness.fairness_report(records, local)
    if paths.is_remote(out_dir):
      for name in ("fairness.json", "fairness.png"):
        (out_dir / name).write_bytes((local / name).read_bytes())
  return report


def _summary(report: dict) -> str:
  lines = [f"overall {report['overall']:.4f} ({report['correct']}/{report['total_questions']}, "
           f"{report['unanswered']} unanswered)"]
  lines += [f"  {task:<28} {r['accuracy']:.4f} ({r['correct']}/{r['total']})"
            for task, r in report["per_task"].items()]
  return "\n".join(lines)


def _compile_only_parser() -> load.ArgumentParser:
  parser = load.ArgumentParser(prog="python -m facellm_jax.evaluate --compile_only",
                               description=compile_only.__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--config", help="training config file[:arg] whose model block is the architecture")
  source.add_argument("--hf", help="local HF InternVL directory (its config.json only)")
  parser.add_argument("--mesh", type=load.mesh_arg, default=None,
                      help="mesh over the slice's chips (default: as evaluate picks it)")
  parser.add_argument("--dtype", choices=sorted(load.DTYPES), default="bfloat16", help="params and compute dtype")
  parser.add_argument("--batch_size", type=int, default=16, help="questions per generation call")
  parser.add_argument("--max_tiles", type=int, default=1, help="448 px tiles per question")
  compile_only.add_args(parser)
  return parser


def _compile_only(argv: list[str]) -> int:
  args = _compile_only_parser().parse_args(argv)
  try:
    report = compile_only.run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
  except (OSError, ValueError) as e:
    print(f"error: {paths.one_line(e)}", file=sys.stderr)
    return 2
  print(json.dumps(report))
  return 0


def main(argv: list[str] | None = None) -> int:
  host_memory.keep_freed_pages()  # before JAX starts
  argv = sys.argv[1:] if argv is None else argv
  if "--compile_only" in argv:
    return _compile_only(argv)
  args = _parser().parse_args(argv)
  try:
    hosts.initialize(args)
    report = run(args)
  except (OSError, ValueError) as e:
    print(f"error: {paths.one_line(e)}", file=sys.stderr)
    return 2
  if report:  # process 0's
    print(_summary(report))
    print(f"report: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
