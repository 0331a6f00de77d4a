"""`facellm-demo [--workdir W]` (or `python -m facellm_jax.demo`): the whole recipe, offline, on CPU.

  synthesize faces (and a held-out FaceXBench-format benchmark of other faces)
  -> generate attribute QA with the offline backend, plus MCQ-style items (`data_gen.mcq`) and
     one attribute card per face (`data_gen.cards`)
  -> pretrain a tiny InternVL's vision tower on the faces' labels (`facellm_jax.demo_vision`), then
     the whole model on the cards (`configs/demo_pretrain.py`), and export it as an HF checkpoint
  -> fine-tune that checkpoint on the QA, MCQ items and cards, as FaceLLM fine-tunes InternVL3
     (`configs/demo.py`)
  -> evaluate on the held-out benchmark with FaceXBench's own prompt and answer extraction
  -> answer one chat question about a held-out face
  -> draw a picture: held-out faces with question, answer and truth, and accuracy per task

The synthetic world's truth is known, so the score means something: the benchmark's faces are
never trained on and chance is 25%. Each stage resumes: a rerun with the same workdir skips what
is done (the training resumes from its checkpoint), and refuses a workdir made with other
settings. Writes `W/demo_report.json` (`synth_mcq_accuracy`, `chance`, per-task accuracy,
timings, the chat answer) and `W/demo.png`, and prints a summary. `W` may be a `gs://` URL: then
the fine-tuning, the evaluation and the report go there (through `facellm_jax.paths`) and the
scratch stages (faces, items, tokenizer, pretraining) stay in a local temporary folder named after
`W`, so a rerun on the same machine resumes them too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from facellm_jax import host_memory, paths

CHANCE = 0.25  # four options per question
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
DEFAULT_PRETRAIN_CONFIG = DEFAULT_CONFIG.with_name("demo_pretrain.py")
SETTINGS_FILE = "demo_settings.json"
REPORT_FILE = "demo_report.json"
PICTURE_FILE = "demo.png"
CHAT_TASK = "gender"  # the chat question is asked about this task's first benchmark face
CHAT_ATTRIBUTE = "demographics"
# The option lists of the card stage's letter lookups (`--mcq-answer text_letter`): not age's,
# whose digits (one token each) make its lists too long for the stage's 40-token rows, and which
# slowed the lookup's learning for every task (benchmarks/README.md, demo section, seventh round).
LOOKUP_TASKS = ("gender", "race", "expression", "attributes", "headpose", "image_quality")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a demo run makes; a workdir keeps the settings it was made with."""
  faces: int = 4000  # training faces
  benchmark_num: int = 50  # held-out questions per benchmark task (7 tasks)
  qa_attributes: tuple[str, ...] = ("demographics",)  # also the chat question's attribute
  mcq_rounds: int = 1  # MCQ items per (face, task)
  mcq_answer: str = "text"  # the MCQ items' reply (data_gen.mcq.ANSWER_FORMS)
  # Fewer rows per step would cut the time (the step's matmuls are the demo's time), but
  # measured it cost expression and head pose (benchmarks/README.md, demo section).
  # The vision stage (demo_vision) has the cheapest steps, a third of a card step's time; 800
  # rather than 400 lifted held-out image quality 80 -> 90% and expression 75 -> 90% (fifth round).
  vision_steps: int = 800
  vision_batch_size: int = 64
  pretrain_steps: int = 600
  pretrain_batch_size: int = 64
  # The pretrained model reads the faces; this teaches the benchmark's format. 340 steps scored
  # 87.7% on the Xeon box (expression 60%) where the EPYC box's float rounding gave 93.1%; 500:
  # 91.4% and, seed 1, 94.9% (benchmarks/README.md, demo section, eighth round).
  steps: int = 500
  batch_size: int = 16  # rows of 208 tokens, ~3 packed examples each (configs/demo.py)
  seed: int = 0
  image_size: int = 112
  eval_batch_size: int = 50
  max_new_tokens: int = 12  # answers are an option's text (and its letter)
  chat_max_new_tokens: int = 40


SMOKE = Settings(faces=16, benchmark_num=2, vision_steps=2, vision_batch_size=8, pretrain_steps=2,
                 pretrain_batch_size=8, steps=3, batch_size=8, eval_batch_size=8)


class DemoError(Exception):
  """Bad input or an unusable workdir: one line on stderr, exit code 2."""


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="facellm-demo", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="facellm_demo",
                 help="where every stage writes, a folder or a gs:// URL (default: ./facellm_demo); "
                      "rerun to resume")
  p.add_argument("--config", default=str(DEFAULT_CONFIG),
                 help="fine-tuning config file[:arg] (default: the repository's configs/demo.py)")
  p.add_argument("--pretrain-config", default=str(DEFAULT_PRETRAIN_CONFIG),
                 help="pretraining config file[:arg] (default: configs/demo_pretrain.py)")
  p.add_argument("--seed", type=int, help=f"world, data order and init seed, >= 0 ({Settings.seed})")
  p.add_argument("--faces", type=int, help=f"training faces ({Settings.faces})")
  p.add_argument("--vision-steps", type=int,
                 help=f"vision pretraining steps on the labels ({Settings.vision_steps})")
  p.add_argument("--pretrain-steps", type=int,
                 help=f"pretraining steps on the cards ({Settings.pretrain_steps})")
  p.add_argument("--steps", type=int, help=f"fine-tuning steps ({Settings.steps})")
  p.add_argument("--benchmark-num", type=int, help=f"questions per task ({Settings.benchmark_num})")
  p.add_argument("--mcq-answer", choices=("text", "text_letter"),  # mcq.ANSWER_FORMS; mcq loads TFDS
                 help="the MCQ items' reply: the option's text (the default) or the text then its "
                      "letter, ' Female(B)', with letter lookups in the card stage (README: demo)")
  p.add_argument("--smoke", action="store_true",
                 help="a tiny end-to-end run (a few faces and steps) that checks the plumbing")
  args = p.parse_args(argv)
  base = SMOKE if args.smoke else Settings()
  overrides = {k: v for k, v in (("seed", args.seed), ("faces", args.faces), ("steps", args.steps),
                                 ("pretrain_steps", args.pretrain_steps),
                                 ("vision_steps", args.vision_steps),
                                 ("benchmark_num", args.benchmark_num)) if v is not None}
  for key, value in overrides.items():
    if value < (0 if key == "seed" else 1):
      p.error(f"--{key.replace('_', '-')} must be at least {0 if key == 'seed' else 1}, got {value}")
  if args.mcq_answer:
    overrides["mcq_answer"] = args.mcq_answer
  args.settings = dataclasses.replace(base, **overrides)
  return args


def _check_workdir(workdir: paths.Path, settings: Settings) -> None:
  """A new or empty folder, or one this demo made with the same settings."""
  path = workdir / SETTINGS_FILE
  want = json.loads(json.dumps(dataclasses.asdict(settings)))
  if path.is_file():
    found = json.loads(path.read_text())
    if found != want:
      diff = ", ".join(f"{k}={found.get(k)!r} there, {want.get(k)!r} now"
                       for k in sorted(set(found) | set(want)) if found.get(k) != want.get(k))
      raise DemoError(f"{workdir} holds a demo made with other settings ({diff}); use another "
                      "--workdir or the same settings")
  elif workdir.is_dir() and any(workdir.iterdir()):
    raise DemoError(f"--workdir {workdir} is a non-empty folder that is not a demo workdir; "
                    "choose a new or empty folder")
  paths.makedirs(workdir)
  paths.write_json(path, want)


def scratch_dir(workdir: paths.Path) -> Path:
  """Where the stages that need local files write: the workdir itself, or for a `gs://` one a
  local folder named after its URL (the same on every rerun on this machine)."""
  if not paths.is_remote(workdir):
    return Path(os.fspath(workdir))
  digest = hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:16]
  return Path(tempfile.gettempdir()) / f"facellm-demo-{digest}"


class _Timer:
  """Wall and process CPU seconds per stage (CPU time counts every thread of this process)."""

  def __init__(self):
    self.stages: dict[str, dict[str, float]] = {}

  def run(self, number: int, name: str, title: str, fn: Callable, *args, **kwargs):
    print(f"\n[{number}/9] {title}", file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    self.stages[name] = {"wall_s": round(time.perf_counter() - wall, 1),
                         "cpu_s": round(time.process_time() - cpu, 1)}
    return result

  def total(self) -> dict[str, float]:
    return {k: round(sum(s[k] for s in self.stages.values()), 1) for k in ("wall_s", "cpu_s")}


def _synthesize(workdir: Path, s: Settings) -> dict[str, int]:
  from data_gen import synth  # pylint: disable=g-import-not-at-top

  faces, bench = workdir / "faces", workdir / "benchmark"
  if not (faces / "labels.csv").is_file():  # written after every image
    synth.write_dataset(faces, s.faces, s.seed, s.image_size)
  if not all((bench / f"synthetic_single_mcq_{t}.json").is_file() for t in synth.BENCHMARK_TASKS):
    synth.write_benchmark(bench, s.benchmark_num, s.seed, s.image_size)
  return {"faces": s.faces, "benchmark_questions": s.benchmark_num * len(synth.BENCHMARK_TASKS)}


def _read_faces(workdir: Path):
  from data_gen import fairface  # pylint: disable=g-import-not-at-top

  faces, bad = fairface.read_labels(str(workdir / "faces" / "labels.csv"), str(workdir / "faces"),
                                    progress=False)
  if bad:
    raise DemoError(f"{workdir / 'faces'} has {len(bad)} unusable row(s), first: {bad[0].as_dict()}; "
                    "delete the workdir and rerun")
  return faces


def _generate(workdir: Path, s: Settings, faces) -> dict[str, int]:
  from data_gen import generate  # pylint: disable=g-import-not-at-top
  from data_gen.backends.offline import OfflineBackend  # pylint: disable=g-import-not-at-top

  out = workdir / "qa"
  report_path = out / "report.json"
  if report_path.is_file():
    report = json.loads(report_path.read_text())
    if report.get("unanswered") == 0 and report.get("expected") == len(faces) * len(s.qa_attributes):
      return {"qa_pairs": report["written"]}
  report = generate.run(faces, [], OfflineBackend(seed=s.seed),
                        generate.RunOptions(str(out), list(s.qa_attributes), seed=s.seed))
  return {"qa_pairs": report["written"]}


def _items(workdir: Path, s: Settings, faces) -> dict[str, int]:
  from data_gen import cards, mcq  # pylint: disable=g-import-not-at-top

  out = workdir / "data"
  counts_path = out / "counts.json"
  if (out / "dataset_info.json").is_file() and counts_path.is_file():
    counts = json.loads(counts_path.read_text())
  else:
    counts = mcq.write_dataset(faces, str(out), seed=s.seed, rounds=s.mcq_rounds,
                               qa_dir=str(workdir / "qa"), with_cards=True,
                               answer_form=s.mcq_answer)
    counts_path.write_text(json.dumps(counts) + "\n")
  if not (workdir / "cards" / "dataset_info.json").is_file():
    if s.mcq_answer == "text_letter":  # the card stage also learns to find the letter (mcq.pointer)
      mcq.write_dataset(faces, str(workdir / "cards"), seed=s.seed, tasks=(), with_cards=True,
                        pointers=LOOKUP_TASKS)
    else:
      cards.write_dataset(faces, str(workdir / "cards"))
  return counts


def _tokenizer(workdir: Path, faces, vocab_size: int) -> dict[str, int]:
  """One tokenizer for both stages: the fine-tuning data's texts plus the first 2,000 faces' cards
  once more (the pretraining data, weighted up), and the chat template's role names, which every
  row carries (one token each instead of 3 and 7: rows 7 tokens shorter)."""
  from data_gen import cards  # pylint: disable=g-import-not-at-top
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top
  from facellm_jax.input import template  # pylint: disable=g-import-not-at-top
  from facellm_jax.input import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  out = workdir / "tokenizer"
  if not (out / "tokenizer.json").is_file():
    source = pipeline.open_tfds_source(workdir / "data")
    step = max(1, len(source) // 20_000)
    texts = [pipeline.record_text(source[i]) for i in range(0, len(source), step)]
    texts += [f"{cards.QUESTION}\n{cards.card(f.labels)}" for f in faces[:2000]]
    texts += ["\n".join(template.ROLES)] * len(texts)
    tmp = workdir / ".tokenizer-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok_lib.train_tokenizer(texts, vocab_size, tmp)
    os.replace(tmp, out)
  return {"vocab_size": tok_lib.load_tokenizer(out).vocab_size}


def stage_config(config_spec: str, workdir: Path, s: Settings, *, data: str, steps: int,
                 batch_size: int, init: str = ""):
  """A stage's training config: the file's, with this demo's data, steps, batch, seed, tokenizer
  and (for fine-tuning) the pretrained HF checkpoint to start from."""
  from facellm_jax.inference import load  # pylint: disable=g-import-not-at-top

  cfg = load.load_config_file(config_spec).unlock()
  cfg.data.dir = str(workdir / data)
  cfg.train.num_steps = steps
  cfg.train.batch_size = batch_size
  cfg.train.seed = s.seed
  cfg.model.vision.image_size = s.image_size
  cfg.model.hf_checkpoint = init
  cfg.tokenizer.path = str(workdir / "tokenizer")
  cfg.checkpoint.every_steps = max(1, min(cfg.checkpoint.every_steps, steps))
  return cfg.lock()


def _vision(local: Path, s: Settings, faces, pretrain_spec: str) -> dict[str, object]:
  """The tower's own pretraining, with the card stage's model and learning rate (2e-3)."""
  from facellm_jax import demo_vision  # pylint: disable=g-import-not-at-top
  from facellm_jax.training import loop  # pylint: disable=g-import-not-at-top

  cfg = stage_config(pretrain_spec, local, s, data="cards", steps=s.vision_steps,
                     batch_size=s.vision_batch_size)
  return dict(demo_vision.run(faces, local / "vision", loop.model_config(cfg),
                              steps=s.vision_steps, batch_size=s.vision_batch_size,
                              learning_rate=cfg.train.learning_rate, seed=s.seed))


def _train(workdir: paths.PathLike, cfg, export_to: Path | None = None) -> dict[str, float]:
  from facellm_jax import export  # pylint: disable=g-import-not-at-top
  from facellm_jax.training import loop  # pylint: disable=g-import-not-at-top

  loop.train(cfg, workdir)
  lines = (paths.path(workdir) / "metrics.jsonl").read_text().splitlines()
  last = json.loads(lines[-1])
  if export_to is not None and not (export_to / "config.json").is_file():
    tmp = export_to.with_name(export_to.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the temporary folder's name
      code = export.main(["--workdir", str(workdir), "--out", str(tmp)])
    if code:
      raise DemoError(f"exporting {workdir} failed (exit {code})")
    os.replace(tmp, export_to)
  return {"steps": last["step"], "final_loss": round(last["loss"], 4)}


def _evaluate(workdir: paths.Path, local: Path, s: Settings, model, mc, tokenizer) -> dict:
  from facellm_jax.evaluation import facexbench  # pylint: disable=g-import-not-at-top
  from facellm_jax.inference import answer  # pylint: disable=g-import-not-at-top

  questions = facexbench.load_benchmark(local / "benchmark")
  generate_fn = answer.make_generate_fn(model, mc, tokenizer, max_new_tokens=s.max_new_tokens,
                                        batch_size=s.eval_batch_size)
  return facexbench.evaluate(questions, generate_fn, workdir / "eval", batch_size=s.eval_batch_size)


def _chat(local: Path, s: Settings, model, mc, tokenizer) -> dict[str, object]:
  from data_gen import prompts, synth  # pylint: disable=g-import-not-at-top
  from facellm_jax.inference import answer  # pylint: disable=g-import-not-at-top

  image = local / "benchmark" / "images" / f"synthetic_single_mcq_{CHAT_TASK}" / "question_1.jpg"
  truth = synth.sample_labels(s.benchmark_num, s.seed, stream=f"benchmark/{CHAT_TASK}")[0]
  question = prompts.QUESTIONS[CHAT_ATTRIBUTE]
  reply = answer.answer(model, mc, tokenizer, question, [image], max_new_tokens=s.chat_max_new_tokens)
  return {"image": str(image), "question": question, "answer": reply,
          "truth": {k: truth[k] for k in ("age", "gender", "race")}}


def _picture(workdir: paths.Path, local: Path, result: dict) -> str:
  from facellm_jax import demo_picture  # pylint: disable=g-import-not-at-top
  from facellm_jax.evaluation import facexbench  # pylint: disable=g-import-not-at-top

  questions = facexbench.load_benchmark(local / "benchmark")
  png = demo_picture.render(questions, facexbench.answered(workdir / "eval"), result["per_task"],
                            CHANCE)
  out = workdir / PICTURE_FILE
  out.write_bytes(png)
  return os.fspath(out)


def run(workdir: paths.PathLike, s: Settings, config_spec: str = str(DEFAULT_CONFIG),
        pretrain_spec: str = str(DEFAULT_PRETRAIN_CONFIG)) -> dict:
  """Runs (or resumes) every stage in `workdir`; returns the report also written there."""
  workdir = paths.check_output_dir(workdir, "--workdir")
  _check_workdir(workdir, s)
  local = scratch_dir(workdir)
  local.mkdir(parents=True, exist_ok=True)
  vision, pretrained = local / "vision", local / "pretrain" / "hf"
  pre_cfg = stage_config(pretrain_spec, local, s, data="cards", steps=s.pretrain_steps,
                         batch_size=s.pretrain_batch_size, init=str(vision / "hf"))
  cfg = stage_config(config_spec, local, s, data="data", steps=s.steps, batch_size=s.batch_size,
                     init=str(pretrained))
  timer = _Timer()
  data = timer.run(1, "synthesize", f"synthesize {s.faces} training faces and a held-out benchmark",
                   _synthesize, local, s)
  faces = _read_faces(local)
  data |= timer.run(2, "generate", f"offline QA: {', '.join(s.qa_attributes)}", _generate,
                    local, s, faces)
  data |= timer.run(3, "items", "MCQ-style items and attribute cards", _items, local, s, faces)
  data |= _tokenizer(local, faces, pre_cfg.model.text.vocab_size)
  vision_stage = timer.run(4, "vision", f"pretrain the vision tower on the labels: {s.vision_steps} "
                           f"steps of {s.vision_batch_size}", _vision, local, s, faces, pretrain_spec)
  pretrain = timer.run(5, "pretrain", f"pretrain on cards: {s.pretrain_steps} steps of "
                       f"{s.pretrain_batch_size}", _train, local / "pretrain", pre_cfg, pretrained)
  train = timer.run(6, "train", f"fine-tune on QA, MCQ and cards: {s.steps} steps of "
                    f"{s.batch_size} packed rows", _train, workdir / "train", cfg)
  from facellm_jax.inference import load  # pylint: disable=g-import-not-at-top

  model, mc, tokenizer = load.load_for_inference(workdir=workdir / "train")
  report = timer.run(7, "evaluate", "held-out synthetic FaceXBench", _evaluate, workdir, local, s,
                     model, mc, tokenizer)
  chat = timer.run(8, "chat", "one chat question", _chat, local, s, model, mc, tokenizer)
  result = {
      "synth_mcq_accuracy": report["overall"],
      "chance": CHANCE,
      "total_questions": report["total_questions"],
      "unanswered": report["unanswered"],
      "per_task": {t: v["accuracy"] for t, v in report["per_task"].items()},
      "per_task_counts": {t: {"correct": v["correct"], "total": v["total"]}
                          for t, v in report["per_task"].items()},
      "per_category": {c: v["accuracy"] for c, v in report["per_category"].items()},
      "chat": chat,
      "data": data,
      "vision": vision_stage | {"batch_size": s.vision_batch_size},
      "pretrain": pretrain | {"config": pretrain_spec, "batch_size": s.pretrain_batch_size},
      "train": train | {"config": config_spec, "batch_size": s.batch_size},
  }
  result["picture"] = timer.run(9, "picture", "the picture", _picture, workdir, local, result)
  result |= {"timings": {**timer.stages, "total": timer.total()}, "settings": dataclasses.asdict(s)}
  paths.write_json(workdir / REPORT_FILE, result)
  return result


def summary(result: dict) -> str:
  """The printed summary: accuracy per task, the chat exchange, time per stage."""
  counts = result["per_task_counts"]
  lines = [f"Held-out synthetic FaceXBench: {result['total_questions']} questions, 4 options "
           f"(chance {result['chance']:.0%})"]
  for task, acc in result["per_task"].items():
    lines.append(f"  {task:<14} {acc:7.1%}  ({counts[task]['correct']}/{counts[task]['total']})")
  lines.append(f"  {'overall':<14} {result['synth_mcq_accuracy']:7.1%}")
  chat = result["chat"]
  truth = chat["truth"]
  lines += ["", f"Chat about {chat['image']}", f"  Q: {chat['question']}", f"  A: {chat['answer']}",
            f"  (truth: {truth['gender']}, aged {truth['age']}, {truth['race']})", ""]
  stages = ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in result["timings"].items() if k != "total")
  total = result["timings"]["total"]
  lines.append(f"Time: {stages}; total {total['wall_s'] / 60:.1f} min wall, "
               f"{total['cpu_s'] / 60:.1f} min CPU")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  host_memory.keep_freed_pages()  # before JAX starts
  from facellm_jax.training import loop  # pylint: disable=g-import-not-at-top

  try:
    result = run(args.workdir, args.settings, args.config, args.pretrain_config)
  except loop.Preempted as e:  # the checkpoint is saved; a rerun continues
    print(f"facellm-demo: {e}", file=sys.stderr)
    return 128 + e.signum
  except (DemoError, OSError, ValueError) as e:
    print(f"facellm-demo: error: {paths.one_line(e)}", file=sys.stderr)
    return 2
  print(summary(result))
  print(f"\nReport: {paths.path(args.workdir) / REPORT_FILE}\nPicture: {result['picture']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
