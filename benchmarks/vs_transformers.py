"""Ours against transformers on CPU: one training step, and greedy generation with a KV cache.

  python benchmarks/vs_transformers.py [--json] [--repeats 5]   # the README's numbers
  python benchmarks/vs_transformers.py --smoke --json           # CI: tiny sizes, one repeat

Both sides get the same InternVL (mid-size for a CPU: ViT 4 x 256 on one 224 px image per row, Qwen2
decoder 8 x 512, 512-token rows, batch 4), the same float32 weights (ours are loaded from the
transformers model's safetensors) and the same inputs, in one process. torch gets as many threads
as XLA's CPU thread pool (the cores this process may use).

1. Train step: forward, backward, clip to global norm 1, AdamW (lr 1e-4, weight decay 0.01).
   Ours is `training/step.py`'s jitted step (state donated); theirs is the model's forward, a
   masked cross-entropy, `loss.backward()`, `clip_grad_norm_` and `torch.optim.AdamW`. The two
   losses are compared step by step: the models train identically, so they must stay equal.
2. Generation: 64 new tokens, greedy, KV cache: our `Generator` against
   `generate(do_sample=False)`, from fresh copies of the same weights; the tokens are compared.

Warm-up calls (and our compilation) are excluded; the timed calls alternate ours/theirs and the
medians are reported. `--json` prints as its last line `{"train_step_ratio": ours/theirs,
"generate_ratio": ours/theirs, ...}` with the absolute medians and memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import common
from facellm_jax import hf, host_memory
from facellm_jax.inference.generate import Generator
from facellm_jax.training import step as step_lib

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0


@dataclasses.dataclass(frozen=True)
class Size:
  vit_layers: int
  vit_width: int
  vit_heads: int
  image: int
  llm_layers: int
  llm_width: int
  llm_heads: int
  kv_heads: int
  mlp: int
  vocab: int
  seq: int
  batch: int
  new_tokens: int


SIZES = {
    "cpu": Size(vit_layers=4, vit_width=256, vit_heads=4, image=224, llm_layers=8, llm_width=512, llm_heads=8,
                kv_heads=2, mlp=2048, vocab=8192, seq=512, batch=4, new_tokens=64),
    "smoke": Size(vit_layers=1, vit_width=32, vit_heads=2, image=56, llm_layers=2, llm_width=64, llm_heads=4,
                  kv_heads=2, mlp=128, vocab=256, seq=32, batch=2, new_tokens=4),
}


def image_tokens(s: Size) -> int:
  """Placeholders per image: 14 px patches, halved on each side by the pixel shuffle."""
  return (s.image // 14 // 2) ** 2


def hf_model(s: Size, seed: int = 0):
  from transformers import InternVLConfig, InternVLForConditionalGeneration

  torch.manual_seed(seed)
  cfg = InternVLConfig(
      vision_config=dict(hidden_size=s.vit_width, intermediate_size=4 * s.vit_width,
                         num_hidden_layers=s.vit_layers, num_attention_heads=s.vit_heads, image_size=s.image,
                         patch_size=14, attention_bias=True, norm_type="layer_norm"),
      text_config=dict(model_type="qwen2", vocab_size=s.vocab, hidden_size=s.llm_width, intermediate_size=s.mlp,
                       num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_heads,
                       num_key_value_heads=s.kv_heads, head_dim=s.llm_width // s.llm_heads,
                       tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
      image_token_id=s.vocab - 1, image_seq_length=image_tokens(s), tie_word_embeddings=False)
  return InternVLForConditionalGeneration(cfg)


def make_inputs(s: Size, seed: int = 0) -> dict[str, np.ndarray]:
  """Rows of random text with one image run at a per-row offset; loss on the text after it."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, s.vocab - 2, (s.batch, s.seq + 1)).astype(np.int32)
  offsets = rng.integers(1, s.seq // 4, s.batch)
  loss_mask = np.zeros((s.batch, s.seq), np.int32)
  n = image_tokens(s)
  for row, off in enumerate(offsets):
    ids[row, off:off + n] = s.vocab - 1
    loss_mask[row, off + n:] = 1
  pixels = rng.standard_normal((s.batch, s.image, s.image, 3)).astype(np.float32)
  return {"ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": loss_mask, "pixels": pixels}


def our_train_step(model, x: dict[str, np.ndarray]):
  """`training/step.py`'s step, compiled ahead of time (its memory analysis is reported)."""
  oc = step_lib.OptimConfig(learning_rate=LR, num_steps=1000, schedule="constant", weight_decay=WEIGHT_DECAY,
                            max_grad_norm=MAX_GRAD_NORM)
  optimizer = nnx.Optimizer(model, step_lib.make_tx(oc), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  b, t = x["ids"].shape
  batch = {  # one micro-batch: leading [A=1] axis, one image slot per row
      "input_ids": x["ids"], "targets": x["targets"], "loss_mask": x["loss_mask"],
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)), "segment_ids": np.ones((b, t), np.int32),
      "pixel_values": x["pixels"][:, None], "num_images": np.ones((b,), np.int32)}
  batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}
  step = step_lib.make_train_step(graphdef, nnx.Param, step_lib.learning_rate_schedule(oc))
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  holder = {"state": state, "losses": []}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    holder["losses"].append(float(metrics["loss"]))

  return run, holder, compiled.memory_analysis()


def their_train_step(model, x: dict[str, np.ndarray]):
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-8, foreach=True)
  ids = torch.from_numpy(x["ids"].astype(np.int64))
  targets = torch.from_numpy(x["targets"].astype(np.int64)).flatten()
  mask = torch.from_numpy(x["loss_mask"]).float().flatten()
  pixels = torch.from_numpy(x["pixels"].transpose(0, 3, 1, 2).copy())
  losses = []

  def run():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, pixel_values=pixels).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="none")
    loss = (nll * mask).sum() / mask.sum().clamp(min=1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    opt.step()
    losses.append(float(loss.detach()))

  return run, losses


def bench_train(s: Size, hf_dir: str, x: dict[str, np.ndarray], repeats: int) -> dict[str, Any]:
  from transformers import InternVLForConditionalGeneration

  theirs = InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
  ours, _ = hf.load_pretrained(hf_dir, jnp.float32)
  with common.progress("train step: compile ours"):
    ours_run, holder, memory = our_train_step(ours, x)
  their_run, their_losses = their_train_step(theirs, x)
  with common.progress(f"train step: 1 warm-up + {repeats} interleaved repeats"):
    result = common.interleaved({"ours": ours_run, "theirs": their_run}, repeats=repeats)
  diffs = [abs(a - b) / abs(b) for a, b in zip(holder["losses"], their_losses)]
  return {**result, "losses_ours": holder["losses"], "losses_theirs": their_losses,
          "loss_max_rel_diff": max(diffs), "attn_implementation_theirs": theirs.config._attn_implementation,
          "xla_memory_mb": {k: round(getattr(memory, f"{k}_size_in_bytes") / common.MB, 1)
                            for k in ("argument", "output", "alias", "temp")}}


def bench_generate(s: Size, hf_dir: str, x: dict[str, np.ndarray], repeats: int) -> dict[str, Any]:
  from transformers import InternVLForConditionalGeneration

  theirs = InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
  ours, _ = hf.load_pretrained(hf_dir, jnp.float32)
  # An EOS id outside the vocabulary: both sides produce exactly `new_tokens` tokens.
  generator = Generator(ours, max_new_tokens=s.new_tokens, eos_ids=(s.vocab,), pad_id=0)
  prompts = x["ids"].tolist()
  ids = torch.from_numpy(x["ids"].astype(np.int64))
  pixels = torch.from_numpy(x["pixels"].transpose(0, 3, 1, 2).copy())
  out = {}

  def ours_run():
    out["ours"] = generator(prompts, x["pixels"])

  def their_run():
    with torch.inference_mode():
      tokens = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                               do_sample=False, max_new_tokens=s.new_tokens, pad_token_id=0)
    out["theirs"] = tokens[:, ids.shape[1]:].tolist()

  with common.progress(f"generate: 1 warm-up + {repeats} interleaved repeats"):
    result = common.interleaved({"ours": ours_run, "theirs": their_run}, repeats=repeats)
  same = sum(a == b for r, q in zip(out["ours"], out["theirs"]) for a, b in zip(r, q))
  return {**result, "new_tokens_per_row": [len(r) for r in out["ours"]],
          "tokens_equal_fraction": same / sum(len(r) for r in out["theirs"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per side and benchmark")
  args = parser.parse_args(argv)
  host_memory.keep_freed_pages()  # for both sides, before either starts its threads
  if args.repeats < 1:
    parser.exit(2, f"vs_transformers: --repeats must be >= 1, got {args.repeats}\n")
  repeats = 1 if args.smoke else args.repeats
  s = SIZES["smoke" if args.smoke else "cpu"]
  threads = common.cpu_threads()
  torch.set_num_threads(threads)  # XLA's CPU thread pool uses every core in our affinity mask

  model = hf_model(s)
  x = make_inputs(s)
  with tempfile.TemporaryDirectory() as hf_dir:
    model.save_pretrained(hf_dir)
    del model
    train = bench_train(s, hf_dir, x, repeats)
    gc.collect()
    generate = bench_generate(s, hf_dir, x, repeats)

  result = {
      "benchmark": "vs_transformers", "smoke": args.smoke,
      "train_step_ratio": round(train["ours"]["median_s"] / train["theirs"]["median_s"], 3),
      "generate_ratio": round(generate["ours"]["median_s"] / generate["theirs"]["median_s"], 3),
      "train_step_ours_s": round(train["ours"]["median_s"], 4),
      "train_step_theirs_s": round(train["theirs"]["median_s"], 4),
      "generate_ours_s": round(generate["ours"]["median_s"], 4),
      "generate_theirs_s": round(generate["theirs"]["median_s"], 4),
      # On a shared machine other jobs slow some rounds (torch's OpenMP threads far more than
      # XLA's pool): the fastest round of each side is the least disturbed estimate.
      "train_step_ratio_of_minima": _ratio_of_minima(train), "generate_ratio_of_minima": _ratio_of_minima(generate),
      "train_step_round_ratios": _round_ratios(train), "generate_round_ratios": _round_ratios(generate),
      "train_loss_max_rel_diff": float(f"{train['loss_max_rel_diff']:.2e}"),
      "generate_tokens_equal_fraction": round(generate["tokens_equal_fraction"], 4),
      "peak_rss_mb": common.peak_rss_mb(), "threads_xla_and_torch": threads,
      "train": train, "generate": generate, "size": dataclasses.asdict(s), "image_tokens": image_tokens(s),
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "transformers": sys.modules["transformers"].__version__},
      "machine": common.machine(),
  }
  if not math.isfinite(result["train_loss_max_rel_diff"]):
    raise SystemExit("vs_transformers: the training losses are not finite; the comparison is void")
  _print(result, args.json)
  return result


def _ratio_of_minima(result: dict[str, Any]) -> float:
  return round(min(result["ours"]["times_s"]) / min(result["theirs"]["times_s"]), 3)


def _round_ratios(result: dict[str, Any]) -> list[float]:
  return [round(a / b, 3) for a, b in zip(result["ours"]["times_s"], result["theirs"]["times_s"])]


def _print(r: dict[str, Any], as_json: bool) -> None:
  t, g = r["train"], r["generate"]
  print(f"train step  ours {r['train_step_ours_s']:.3f} s  theirs {r['train_step_theirs_s']:.3f} s  "
        f"ratio {r['train_step_ratio']:.2f}, of minima {r['train_step_ratio_of_minima']:.2f}  "
        f"(per round {r['train_step_round_ratios']}; "
        f"losses agree to {r['train_loss_max_rel_diff']:.1e})")
  print(f"  RSS growth during a step: ours {t['ours']['rss_growth_mb']} MB, theirs {t['theirs']['rss_growth_mb']} MB;"
        f" XLA buffers {t['xla_memory_mb']}")
  print(f"generate    ours {r['generate_ours_s']:.3f} s  theirs {r['generate_theirs_s']:.3f} s  "
        f"ratio {r['generate_ratio']:.2f}, of minima {r['generate_ratio_of_minima']:.2f}  "
        f"(per round {r['generate_round_ratios']}; "
        f"tokens equal: {r['generate_tokens_equal_fraction']:.1%})")
  print(f"  RSS growth during a call: ours {g['ours']['rss_growth_mb']} MB, theirs {g['theirs']['rss_growth_mb']} MB;"
        f" process peak {r['peak_rss_mb']} MB; {r['threads_xla_and_torch']} threads each")
  if as_json:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
