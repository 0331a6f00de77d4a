"""The demo's first training stage: pretrain the vision tower on the faces' labels.

InternVL starts from an InternViT pretrained on its own objective before any language model sees
it; the demo's tower starts from scratch, and through a random decoder it learns to see slowly:
1,200 card steps of 64 left expression at 0.76 and image quality at chance on the benchmark. Read
directly, the same tower and projector learn fast: one linear head per card factor on the
projected image token (the demo folds the ViT grid into one token) reads expression at 0.93 and
head pose at 0.99 on held-out faces after 400 steps of 64 (benchmarks/README.md, demo section);
the demo runs longer (`demo.Settings.vision_steps`), which lifted the benchmark's image quality
and expression to 90%.

So this stage trains the ViT + projector + those heads (summed cross-entropy), drops the heads
and saves the whole FaceLLM (decoder still at its random init) as an HF checkpoint, which the card
stage starts from. It lasts about 2 minutes and writes its checkpoint only when done: interrupted,
it starts over on the rerun.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from data_gen import synth
from facellm_jax import hf
from facellm_jax.input import image as image_lib
from facellm_jax.models.config import FaceLLMConfig
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.training import loop

# The card's factors (data_gen.cards), each read by its own head.
FACTORS = ("age", "gender", "race", "expression", "head_pose", "eyeglasses", "facial_hair",
           "sharpness", "jpeg_quality")
METRICS_FILE = "metrics.json"


def read_faces(faces: Sequence, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 pixels [N, S, S, 3] and label indices [N, len(FACTORS)] of `data_gen.fairface` faces."""
  pixels = np.stack([image_lib.tiles(image_lib.load_image(f.path), image_size)[0] for f in faces])
  try:
    labels = np.array([[synth.VOCAB[k].index(f.labels[k]) for k in FACTORS] for f in faces])
  except (KeyError, ValueError) as e:
    raise ValueError(f"the vision pretraining needs the synthetic world's labels ({FACTORS}); "
                     f"{e} is missing or unknown") from None
  return pixels, labels


class _Heads(nnx.Module):
  """The tower, the projector and one linear read-out per factor on the first image token."""

  def __init__(self, model: FaceLLM, classes: Sequence[int], rngs: nnx.Rngs):
    self.model = model
    self.bounds = tuple(int(b) for b in np.cumsum([0, *classes]))
    self.head = nnx.Linear(model.config.text.hidden_size, self.bounds[-1], rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> list[jax.Array]:
    out = self.head(self.model.encode_images(pixel_values)[:, 0])
    return [out[:, a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]


def _loss(heads: _Heads, pixel_values: jax.Array, labels: jax.Array):
  logits = heads(pixel_values)
  loss = sum(optax.softmax_cross_entropy_with_integer_labels(x, labels[:, j]).mean()
             for j, x in enumerate(logits))
  return loss, jnp.stack([jnp.mean(x.argmax(-1) == labels[:, j]) for j, x in enumerate(logits)])


@nnx.jit
def _step(heads: _Heads, opt: nnx.Optimizer, pixel_values: jax.Array, labels: jax.Array):
  (loss, acc), grads = nnx.value_and_grad(_loss, has_aux=True)(heads, pixel_values, labels)
  opt.update(heads, grads)
  return loss, acc


def train(mc: FaceLLMConfig, pixels: np.ndarray, labels: np.ndarray, *, steps: int,
          batch_size: int, learning_rate: float, seed: int,
          show_progress: bool = True) -> tuple[FaceLLM, dict[str, object]]:
  """Trains a fresh FaceLLM's tower and projector; returns it and the last 25 steps' metrics."""
  model = FaceLLM(mc, rngs=nnx.Rngs(seed))
  classes = [len(synth.VOCAB[k]) for k in FACTORS]
  heads = _Heads(model, classes, nnx.Rngs(seed + 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 20), steps,
                                                end_value=learning_rate / 10)
  # Only the tower, projector and heads get gradients; the decoder keeps its init.
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("language")))
  opt = nnx.Optimizer(heads, optax.adamw(schedule, weight_decay=0.0), wrt=trainable)
  order = np.random.default_rng(seed)
  losses, accs = [], []
  with loop.Preemption() as stop, tqdm(total=steps, desc="vision", unit="step",
                                        dynamic_ncols=True, disable=not show_progress) as bar:
    for step in range(steps):
      if stop.requested(sync=False):
        raise loop.Preempted(stop.signum, step, saved=False)
      idx = order.integers(0, len(labels), batch_size)
      loss, acc = _step(heads, opt, jnp.asarray(image_lib.normalize(pixels[idx])),
                        jnp.asarray(labels[idx]))
      losses.append(loss)  # device arrays: reading one every step would wait for its step
      accs.append(acc)
      bar.update()
      if step % 25 == 24:
        bar.set_postfix(loss=f"{np.mean(jax.device_get(losses[-25:])):.3f}")
  last, loss = np.mean(jax.device_get(accs[-25:]), axis=0), np.mean(jax.device_get(losses[-25:]))
  return model, {"steps": steps, "final_loss": round(float(loss), 4),
                 "train_accuracy": {k: round(float(a), 3) for k, a in zip(FACTORS, last)}}


def run(faces: Sequence, out_dir: Path, mc: FaceLLMConfig, *, steps: int, batch_size: int,
        learning_rate: float, seed: int) -> Mapping[str, object]:
  """Trains and writes `out_dir/hf` (the checkpoint) and `out_dir/metrics.json`, unless done."""
  metrics_path = out_dir / METRICS_FILE
  if metrics_path.is_file() and (out_dir / "hf" / "config.json").is_file():
    return json.loads(metrics_path.read_text())
  pixels, labels = read_faces(faces, mc.vision.image_size)
  model, metrics = train(mc, pixels, labels, steps=steps, batch_size=batch_size,
                         learning_rate=learning_rate, seed=seed)
  tmp = out_dir / "hf.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  hf.save_pretrained(model, mc, tmp)
  os.replace(tmp, out_dir / "hf")
  metrics_path.write_text(json.dumps(metrics) + "\n")
  return metrics
