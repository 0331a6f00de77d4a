"""Where `facellm-demo`'s time goes: the pieces of one training step, the checkpoint, the eval batch.

  python benchmarks/demo_profile.py --workdir facellm_demo   # a demo workdir past its pretraining

Times each piece alone, in one process, on the demo's own data, tokenizer and configs (both stages):
- `input`: one batch from `pipeline.make_dataset` (decode, template, tokenize, pack, batch), the
  loop's 2 read threads;
- `compile`: the first call of the jitted train step; `step`: a steady step on one fixed batch
  (device time, blocked on);
- `loop_save_call`: what building a checkpoint's state costs (`nnx.merge`, `to_pure_dict`, the
  iterator's state; the loop now pays it only when a save is due); `checkpoint`: one save, waited for;
- `eval_batch`: one greedy generation batch of the demo's eval batch size (first call, steady).
Wall and process-CPU seconds each (CPU counts every thread). Prints one JSON object. On a shared
box compare the pieces with each other (ratios), not across runs; `uptime` goes with the numbers.
`--pretrain-config/--config/--batch-sizes` time another recipe's steps on the same workdir, e.g. an
older commit's config files (`git show REV:configs/demo.py > configs/demo_old.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from facellm_jax import demo, host_memory
from facellm_jax.input import pipeline
from facellm_jax.input import tokenizer as tok_lib
from facellm_jax.training import checkpoint as ckpt_lib
from facellm_jax.models import sharding
from facellm_jax.models import lora as lora_lib
from facellm_jax.training import loop
from facellm_jax.training import step as step_lib


def _time(fn, repeats: int) -> dict[str, float]:
  """Median wall and CPU seconds of `fn()` over `repeats` calls."""
  walls, cpus = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  return {"wall_s": round(float(np.median(walls)), 4), "cpu_s": round(float(np.median(cpus)), 4)}


def profile_stage(cfg, repeats: int) -> dict:
  """The input batch, compile, steady step, the loop's per-step save call and one checkpoint."""
  source = pipeline.open_tfds_source(cfg.data.dir)
  tokenizer = tok_lib.load_tokenizer(cfg.tokenizer.path)
  mc = loop.model_config(cfg)
  dataset = pipeline.make_dataset(source, tokenizer, image_size=mc.vision.image_size,
                                  num_image_tokens=mc.image_seq_length, seq_len=cfg.data.cutoff_len,
                                  batch_size=cfg.train.batch_size, packing=cfg.data.packing, seed=0,
                                  max_images_per_row=loop.image_slots(cfg, mc))
  it = iter(dataset)
  for _ in range(3):  # the read threads' prefetch fills up first
    next(it)
  out = {"input": _time(lambda: next(it), repeats)}
  mesh = sharding.make_mesh(dict(cfg.mesh.shape), jax.devices())
  model = loop.build_model(cfg, mc, mesh)
  wrt = lora_lib.trainable_filter(cfg.train.trainable)  # the demo freezes the tower
  optimizer = nnx.Optimizer(model, step_lib.make_tx(loop.optim_config(cfg)), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  state_sh = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  batch_np = next(it)
  batch_sh = step_lib.batch_shardings(mesh, {k: None for k in batch_np})
  batch = loop._global_batch([batch_np], batch_sh, 1)  # pylint: disable=protected-access
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, wrt, step_lib.learning_rate_schedule(loop.optim_config(cfg)),
                               loss_chunk=cfg.train.loss_chunk),
      state_sh, batch_sh, mesh)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = fn(holder["state"], batch)
    jax.block_until_ready(metrics)

  out["compile"] = _time(one_step, 1)
  out["step"] = _time(one_step, repeats)

  def save_call():
    m, o = nnx.merge(graphdef, holder["state"])
    nnx.to_pure_dict(nnx.state(m, wrt)), nnx.to_pure_dict(nnx.state(o))
    it.get_state()

  out["loop_save_call"] = _time(save_call, repeats)
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = ckpt_lib.Checkpointer(pathlib.Path(tmp) / "c", every_steps=1, keep=2, meta={})
    count = iter(range(1, 10**6))

    def checkpoint():
      m, o = nnx.merge(graphdef, holder["state"])
      ckpt.save(next(count), nnx.to_pure_dict(nnx.state(m, wrt)), nnx.to_pure_dict(nnx.state(o)),
                it.get_state(), force=True)
      ckpt.wait()

    out["checkpoint"] = _time(checkpoint, 3)
    ckpt.close()
  out["tokens_per_step"] = cfg.train.batch_size * cfg.data.cutoff_len
  # Segments are numbered 1..k within a row: a row's max is its number of packed examples.
  out["examples_per_step"] = int(np.sum(np.max(batch_np["segment_ids"], axis=-1)))
  return out


def profile_eval(workdir: pathlib.Path, s: demo.Settings) -> dict:
  """One greedy eval batch of the demo's size, from the fine-tuned (or the pretrained) model."""
  from facellm_jax.evaluation import facexbench  # pylint: disable=g-import-not-at-top
  from facellm_jax.inference import answer, load  # pylint: disable=g-import-not-at-top

  trained = (workdir / "train" / "checkpoints").is_dir()
  model, mc, tokenizer = (load.load_for_inference(workdir=workdir / "train") if trained
                          else load.load_for_inference(hf_checkpoint=workdir / "pretrain" / "hf"))
  questions = facexbench.load_benchmark(workdir / "benchmark")[:s.eval_batch_size]
  prompts = [facexbench.EvalPrompt(q.qid, facexbench.build_prompt(q), q.image_paths) for q in questions]
  gen = answer.make_generate_fn(model, mc, tokenizer, max_new_tokens=s.max_new_tokens,
                                batch_size=s.eval_batch_size)
  first = _time(lambda: gen(prompts), 1)
  return {"eval_batch_first": first, "eval_batch": _time(lambda: gen(prompts), 2),
          "batch_size": s.eval_batch_size, "max_new_tokens": s.max_new_tokens}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, type=pathlib.Path,
                 help="a demo workdir with its data, cards, tokenizer and pretrain/hf")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--pretrain-config", default=str(demo.DEFAULT_PRETRAIN_CONFIG),
                 help="pretraining config file (default: the demo's), e.g. an older recipe's")
  p.add_argument("--config", default=str(demo.DEFAULT_CONFIG),
                 help="fine-tuning config file (default: the demo's)")
  p.add_argument("--batch-sizes", type=int, nargs=2, metavar=("PRETRAIN", "FINE_TUNE"),
                 help="rows per step of each stage (default: the workdir's settings)")
  args = p.parse_args(argv)
  host_memory.keep_freed_pages()  # as facellm-demo does, before JAX starts
  if not (args.workdir / "pretrain" / "hf" / "config.json").is_file():
    print(f"demo_profile: error: {args.workdir} has no pretrain/hf yet; run facellm-demo there first",
          file=sys.stderr)
    return 2
  s = demo.Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in
                       json.loads((args.workdir / demo.SETTINGS_FILE).read_text()).items()})
  pre_rows, fine_rows = args.batch_sizes or (s.pretrain_batch_size, s.batch_size)
  pre = demo.stage_config(args.pretrain_config, args.workdir, s, data="cards",
                          steps=s.pretrain_steps, batch_size=pre_rows)
  fine = demo.stage_config(args.config, args.workdir, s, data="data", steps=s.steps,
                           batch_size=fine_rows, init=str(args.workdir / "pretrain" / "hf"))
  result = {"uptime": os.getloadavg(), "cpus": os.cpu_count(),
            "pretrain": profile_stage(pre, args.repeats), "train": profile_stage(fine, args.repeats),
            "eval": profile_eval(args.workdir, s)}
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
