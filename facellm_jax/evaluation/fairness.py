"""Fairness report: how a model's age / gender / race answers fare across demographic groups.

FairFace was built to measure exactly this, yet none of the FaceLLM reference code reports it.
For each task (the question's sub-category: age, gender, race) and each grouping of the faces
(by race, by gender, by age bin) we give the accuracy per group, its counts, and the gap
between the best and the worst group, plus a bar plot of all of it.

A record is one answered question about one labelled face:
  {"task": "age", "is_correct": True, "race": "Indian", "gender": "Female", "age": "20-29"}
A missing or None label leaves the record out of that grouping only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

GROUPINGS = ("race", "gender", "age")
# FairFace's vocabularies, in the order plots show them; unseen labels follow, sorted.
GROUP_ORDER = {
    "race": ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian",
             "Middle Eastern"),
    "gender": ("Male", "Female"),
    "age": ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69",
            "more than 70"),
}
BIAS_TASKS = ("age", "gender", "race")


def fairness_report(records: Iterable[Mapping], out_dir: str | Path,
                    min_group_size: int = 1) -> dict:
  """Writes `out_dir/fairness.json` and `out_dir/fairness.png`; returns the JSON's content.

  Shape: {"min_group_size", "tasks": {task: {"accuracy", "correct", "total",
  "by_<grouping>": {"groups": {group: {"accuracy", "correct", "total"}},
  "best", "worst", "gap"}}}}. Groups with fewer than `min_group_size` records are listed
  but left out of best/worst/gap, so one unlucky face cannot make the gap; the gap is None
  when fewer than two groups qualify.
  """
  records = list(records)
  if not records:
    raise ValueError("fairness_report got no records; expected answered questions with "
                     "'task', 'is_correct' and race/gender/age labels.")
  tallies: dict[str, dict[str, dict[str, list[int]]]] = {}
  for index, record in enumerate(records):
    task, hit = record.get("task"), record.get("is_correct")
    if not isinstance(task, str) or not isinstance(hit, bool):
      raise ValueError(f"record {index}: expected a 'task' string and an 'is_correct' bool, "
                       f"found {dict(record)!r}.")
    per_task = tallies.setdefault(task, {"all": {"all": [0, 0]}})
    per_task["all"]["all"][0] += hit
    per_task["all"]["all"][1] += 1
    for grouping in GROUPINGS:
      label = record.get(grouping)
      if label is None:
        continue
      counts = per_task.setdefault(grouping, {}).setdefault(str(label), [0, 0])
      counts[0] += hit
      counts[1] += 1

  report = {"min_group_size": min_group_size, "tasks": {}}
  for task, per_task in tallies.items():
    correct, total = per_task["all"]["all"]
    entry = {"accuracy": correct / total, "correct": correct, "total": total}
    for grouping in GROUPINGS:
      if grouping in per_task:
        entry[f"by_{grouping}"] = _grouping(grouping, per_task[grouping], min_group_size)
    report["tasks"][task] = entry

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "fairness.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
  _plot(report, out_dir / "fairness.png")
  return report


def _grouping(grouping: str, counts: Mapping[str, list[int]], min_group_size: int) -> dict:
  known = GROUP_ORDER[grouping]
  order = [g for g in known if g in counts] + sorted(g for g in counts if g not in known)
  groups = {g: {"accuracy": counts[g][0] / counts[g][1], "correct": counts[g][0],
                "total": counts[g][1]} for g in order}
  eligible = [g for g in order if groups[g]["total"] >= min_group_size]
  if len(eligible) < 2:
    return {"groups": groups, "best": None, "worst": None, "gap": None}
  # Ties keep vocabulary order, so the result does not depend on record order.
  best = max(eligible, key=lambda g: groups[g]["accuracy"])
  worst = min(eligible, key=lambda g: groups[g]["accuracy"])
  return {"groups": groups, "best": best, "worst": worst,
          "gap": groups[best]["accuracy"] - groups[worst]["accuracy"]}


def _plot(report: dict, path: Path) -> None:
  """One row per task, one column per grouping; bars per group, best-worst gap in the title."""
  tasks = list(report["tasks"])
  fig = Figure(figsize=(5 * len(GROUPINGS), 3.4 * len(tasks)), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(tasks), len(GROUPINGS), squeeze=False)
  for row, task in enumerate(tasks):
    for col, grouping in enumerate(GROUPINGS):
      ax = axes[row][col]
      result = report["tasks"][task].get(f"by_{grouping}")
      if result is None:
        ax.set_axis_off()
        ax.set_title(f"{task} answers by {grouping}: no labels", fontsize=9)
        continue
      names = list(result["groups"])
      accuracies = [result["groups"][g]["accuracy"] for g in names]
      bars = ax.bar(range(len(names)), accuracies, color="#4c72b0")
      for bar, name in zip(bars, names):
        ax.annotate(f"n={result['groups'][name]['total']}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
      ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
      ax.set_ylim(0, 1.1)
      ax.set_ylabel("accuracy")
      if result["gap"] is None:
        title = f"{task} answers by {grouping}: gap n/a"
      else:
        title = (f"{task} answers by {grouping}: gap {result['gap']:.2f} "
                 f"({result['best']} vs {result['worst']})")
        for group, color in ((result["best"], "#55a868"), (result["worst"], "#c44e52")):
          bars[names.index(group)].set_color(color)
          ax.axhline(result["groups"][group]["accuracy"], color=color, linestyle="--",
                     linewidth=1)
      ax.set_title(title, fontsize=9)
  fig.savefig(path, dpi=100)


def records_from_predictions(predictions_path: str | Path,
                             labels: Mapping[str, Mapping[str, str]],
                             tasks: Sequence[str] = BIAS_TASKS) -> list[dict]:
  """Joins a FaceXBench `predictions.jsonl` with the faces' labels, keyed by qid.

  `labels[qid]` holds the face's "race", "gender" and "age" (any subset). Only questions
  with labels and a task in `tasks` become records: questions about several faces have no
  single group and are left out by leaving them out of `labels`.
  """
  path = Path(predictions_path)
  if not path.is_file():
    raise FileNotFoundError(f"Predictions file {path} not found; run the FaceXBench "
                            "evaluation first.")
  records = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      prediction = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not a JSON line ({e}).") from e
    face = labels.get(prediction.get("qid"))
    if face is None or prediction.get("task") not in tasks:
      continue
    records.append({"qid": prediction["qid"], "task": prediction["task"],
                    "is_correct": prediction.get("is_correct"),
                    **{g: face.get(g) for g in GROUPINGS}})
  return records
