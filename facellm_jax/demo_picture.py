"""The demo's picture: held-out faces with the question, the model's answer and the truth, and the
accuracy per task against chance, as one PNG a newcomer can look at (`facellm-demo` writes it).

Drawn with matplotlib's Agg canvas on a `Figure` of its own (no pyplot, no display, no global
state), so it works on a headless box and in tests.
"""

from __future__ import annotations

import io
import textwrap
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from facellm_jax.evaluation import facexbench

FACES_PER_TASK = 2
_RIGHT, _WRONG, _BAR, _CHANCE = "#1a7f37", "#c62828", "#4c72b0", "#888888"


def pick(questions: Sequence[facexbench.Question], per_task: int = FACES_PER_TASK
         ) -> list[facexbench.Question]:
  """The first `per_task` questions of every task, tasks in benchmark order: a fixed sample, so
  two runs' pictures show the same faces."""
  by_task: dict[str, list[facexbench.Question]] = {}
  for q in questions:
    if len(by_task.setdefault(q.task, [])) < per_task:
      by_task[q.task].append(q)
  return [q for qs in zip(*by_task.values()) for q in qs] if by_task else []


def _option(q: facexbench.Question, letter: str | None) -> str:
  if letter is None:
    return "no option"
  return f"({letter}) {q.options[facexbench.LETTERS.index(letter)]}"


def render(questions: Sequence[facexbench.Question], predictions: Mapping[str, Mapping],
           per_task: Mapping[str, float], chance: float, *, dpi: int = 80) -> bytes:
  """The PNG bytes: a grid of sampled held-out faces (one column per task), then the bar chart.

  `predictions` are `facexbench.answered`'s records by qid; `per_task` the accuracies in [0, 1].
  """
  shown = pick(questions)
  cols = max(1, len({q.task for q in shown}))
  rows = -(-len(shown) // cols)
  fig = Figure(figsize=(2.3 * cols, 3.0 * rows + 3.0), dpi=dpi, facecolor="white")
  FigureCanvasAgg(fig)
  grid = fig.add_gridspec(rows + 1, cols, height_ratios=[3.0] * rows + [2.4], hspace=0.75,
                          left=0.05, right=0.98, top=0.88, bottom=0.07)
  for k, q in enumerate(shown):
    ax = fig.add_subplot(grid[k // cols, k % cols])
    with Image.open(q.image_paths[0]) as img:
      ax.imshow(np.asarray(img.convert("RGB")))
    ax.set_xticks([])
    ax.set_yticks([])
    record = predictions.get(q.qid, {})
    answer = str(record.get("prediction", "(not answered)"))
    right = record.get("extracted") == q.correct
    ax.set_title("\n".join(textwrap.wrap(q.question_text, 26)[:3]), fontsize=7, loc="left")
    ax.set_xlabel(f"model: {textwrap.shorten(answer, 24)}\ntruth: {_option(q, q.correct)}",
                  fontsize=7.5, color=_RIGHT if right else _WRONG, loc="left")
    for spine in ax.spines.values():
      spine.set_color(_RIGHT if right else _WRONG)
      spine.set_linewidth(2.5)
  bars = fig.add_subplot(grid[rows, :])
  tasks = list(per_task)
  values = [per_task[t] for t in tasks]
  bars.bar(tasks, values, color=_BAR)
  for x, v in enumerate(values):
    bars.text(x, v + 0.02, f"{v:.0%}", ha="center", fontsize=8)
  bars.axhline(chance, color=_CHANCE, linestyle="--", linewidth=1.2)
  bars.set_xlim(-0.6, len(tasks) + 0.4)  # room right of the bars for the chance label
  bars.text(len(tasks) + 0.35, chance + 0.02, f"chance {chance:.0%}", ha="right", fontsize=8,
            color=_CHANCE)
  bars.set_ylim(0, 1.12)
  bars.set_ylabel("held-out accuracy")
  bars.set_title("accuracy per task on held-out faces", fontsize=9)
  bars.tick_params(axis="x", labelsize=8)
  fig.suptitle("FaceLLM-JAX demo: held-out synthetic faces, the model's answer and the truth "
               "(green: right, red: wrong)", fontsize=11, y=0.985)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return buf.getvalue()
