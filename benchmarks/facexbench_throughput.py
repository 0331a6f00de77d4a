"""FaceXBench runner throughput (questions/s) on the tiny config, before and after issue 12, in one process.

  python benchmarks/facexbench_throughput.py [--num 24] [--batch_size 8] [--repeats 2] [--preset reference]

The benchmark is `data_gen synth`'s held-out MCQ folder (7 single-image tasks, `--num` questions
each) plus `--num` questions on 2-4 of its images, so the prompts differ in length as
FaceXBench's do. The model is the tiny config's seeded init made to answer in one token then stop
(`brief_model`), as a fine-tuned model's option letter does; a random init falls into repeating
loops that rarely hit EOS and would decode all `max_new_tokens`. Both contenders run `facexbench.evaluate` with `answer.make_generate_fn` at
the CLI's preset (`reference`: 2,048 new tokens, the `evaluate` default; `fast`: 32):

- before: questions in file order, the KV cache sized for `max_new_tokens` from the start
  (`by_length=False`, `decode_stage=None`: what the runner did before issue 12);
- after: the defaults: shortest prompts first, cache grown in stages from 32 new tokens.

Each contender runs once untimed (compiles), then `--repeats` alternating timed rounds; the last
line is one JSON object with both medians, the speed-up and whether every prediction is equal.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import jax  # noqa: E402
from configs import tiny  # noqa: E402
from data_gen import synth  # noqa: E402

from facellm_jax.evaluation import facexbench  # noqa: E402
from facellm_jax.evaluate import FAST, REFERENCE  # noqa: E402
from facellm_jax.inference import answer, load  # noqa: E402
from facellm_jax.input import tokenizer as tok_lib  # noqa: E402
from facellm_jax.models import sharding  # noqa: E402
from facellm_jax.training import loop  # noqa: E402


def write_benchmark(root: pathlib.Path, num: int) -> list[facexbench.Question]:
  """The synthetic single-image tasks plus one file of 2-4-image questions on their faces."""
  synth.write_benchmark(root, num, seed=0)
  images = sorted(str(p.relative_to(root)) for p in root.glob("images/*/*.jpg"))
  rng = np.random.default_rng(0)
  questions = {}
  for i in range(num):
    k = 2 + i % 3
    questions[str(i)] = {"image_paths": [str(x) for x in rng.choice(images, k, replace=False)],
                         "question_text": "Which image shows the oldest person?",
                         "options": [f"Image {j + 1}" for j in range(min(k, 4))], "correct_answer_option": "A"}
  doc = {"category": "bias_fairness", "sub-category": "age", "dataset": "synthetic", "question_type": "MCQ",
         "num_images": "multiple", "prepend_text": "", "postpend_text": "Answer with the option letter.",
         "questions": questions}
  (root / "synthetic_multiple_mcq_age.json").write_text(json.dumps(doc))
  return facexbench.load_benchmark(root)


def brief_model(tokenizer: tok_lib.Tokenizer, prompt_end: int):
  """The tiny config's seeded init, made to answer in one token: every token embedding carries a
  shared direction +v, but the prompt's last token (`prompt_end`, the template's "assistant\\n")
  carries -v; the end-of-turn logit reads 2v and `prompt_end`'s v. So the first new token is the
  model's own choice (both read -v there) and the next one is the end of turn."""
  mc = loop.model_config(tiny.get_config())
  model = sharding.create_model(mc, load.inference_mesh(mc, "data=1", jax.devices()[:1]))
  embed, head = np.array(model.language.embed[...]), np.array(model.language.lm_head[...])
  v = np.random.default_rng(1).standard_normal(embed.shape[1]).astype(np.float32)
  v *= 4 * np.linalg.norm(embed, axis=1).mean() / np.linalg.norm(v)
  embed += v
  embed[prompt_end] -= 2 * v
  head[:, tokenizer.im_end_id], head[:, prompt_end] = 2 * v, v
  model.language.embed.set_value(jax.numpy.asarray(embed))
  model.language.lm_head.set_value(jax.numpy.asarray(head))
  return model, mc


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=24, help="questions per synthetic task (8 tasks)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--preset", choices=("reference", "fast"), default="reference")
  parser.add_argument("--smoke", action="store_true", help="CI size: 2 questions per task, one repeat")
  args = parser.parse_args()
  if args.smoke:
    args.num, args.repeats = 2, 1
  preset = REFERENCE if args.preset == "reference" else FAST
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    questions = write_benchmark(tmp / "bench", args.num)
    tokenizer = tok_lib.train_tokenizer([facexbench.build_prompt(q) for q in questions], 1024, tmp / "tok")
    mc = loop.model_config(tiny.get_config())
    prompt_end = int(answer.prepare(mc, tokenizer, "?", ())[0][-1])  # the template end
    model, mc = brief_model(tokenizer, prompt_end)
    runs: dict[str, dict] = {}

    def contender(name: str, **options):
      by_length = options.pop("by_length")
      generate_fn = answer.make_generate_fn(model, mc, tokenizer, batch_size=args.batch_size, **preset, **options)

      def run():
        out = tmp / f"{name}-{len(os.listdir(tmp))}"
        facexbench.evaluate(questions, generate_fn, out, batch_size=args.batch_size, by_length=by_length)
        runs[name] = facexbench.answered(out)
      return run

    with common.progress(f"{len(questions)} questions x {1 + args.repeats} runs each"):
      timing = common.interleaved({"before": contender("before", by_length=False, decode_stage=None),
                                   "after": contender("after", by_length=True)}, repeats=args.repeats)
  before, after = (runs[k] for k in ("before", "after"))
  equal = sorted(before) == sorted(after) and all(before[q]["prediction"] == after[q]["prediction"] for q in before)
  lengths = [len(r["prediction"]) for r in after.values()]
  qps = {k: len(questions) / timing[k]["median_s"] for k in timing}
  print(json.dumps({"questions": len(questions), "batch_size": args.batch_size, "preset": args.preset, **preset,
                    "before_qps": round(qps["before"], 2), "after_qps": round(qps["after"], 2),
                    "speedup": round(qps["after"] / qps["before"], 2), "predictions_equal": equal,
                    "mean_answer_chars": round(float(np.mean(lengths)), 1), "timing": timing,
                    "machine": common.machine()}))


if __name__ == "__main__":
  main()
