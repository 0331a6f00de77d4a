"""`python -m data_gen generate`: FairFace labels + images -> attribute QA -> TFDS dataset.

The driver owns everything a backend must not get wrong: it validates all input before
writing anything, sends each (image, attribute) at most once per run, journals every result
before counting it (so `kill -9` loses only in-flight requests), resumes from the journal, and
only then writes the dataset and OUT/report.json. The API key comes from OPENAI_API_KEY alone
and is scrubbed from anything a backend hands back.

A journaled answer is reused only if it was made from what this run would send (the backend's
`answer_inputs`: labels in the prompt, prompt text, model, image bytes). One made from anything
else (a label fixed in the CSV, a new --prompts file, another --model) is stale: `--stale redo`
(the default) asks again and counts it as `redone`; `--stale refuse` stops before any request.
A stale answer never reaches the dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import inspect
import os
import sys
import time
from typing import Sequence

import tqdm

from data_gen import fairface, prompts, tfds_writer
from data_gen.cli import OUTPUT_MARKERS, CliError, OneLineParser, check_out_dir
from data_gen.backends.base import (Backend, FatalApiError, Request, Result, fingerprint,
                                    request_inputs)
from data_gen.backends.offline import OfflineBackend
from data_gen.journal import Journal

DEFAULT_MODEL = "gpt-4o-2024-11-20"
JOURNAL_FILE = os.path.join(".journal", "journal.sqlite")
_BATCH_PRICED = {"openai": False, "openai-batch": True}  # backend -> billed at Batch price


def build_requests(faces: Sequence[fairface.Face], attributes: Sequence[str],
                   prompt_set: prompts.PromptSet) -> list[Request]:
  """One request per (image, attribute), images in CSV order, attributes in canonical order."""
  return [Request(face.image_id, attribute, face.path, prompt_set.system,
                  prompt_set.user_prompt(attribute, face.labels), dict(face.labels))
          for face in faces for attribute in attributes]


def fingerprinted(requests: Sequence[Request], backend: Backend) -> list[Request]:
  """The requests, each with the fingerprint of what `backend`'s answer to it is made from."""
  inputs_of = getattr(backend, "answer_inputs", request_inputs)
  return [dataclasses.replace(r, inputs=fingerprint(inputs_of(r))) for r in requests]


@dataclasses.dataclass
class RunOptions:
  out: str
  attributes: list[str]
  prompt_set: prompts.PromptSet = dataclasses.field(default_factory=prompts.PromptSet)
  seed: int = 0
  val_fraction: float = 0.0
  model: str | None = None  # for the cost estimate; None for backends that cost nothing
  secret: str | None = None  # scrubbed from every result before it is journaled
  progress: bool = True
  stale: str = "redo"  # a journaled answer made from other inputs: "redo" or "refuse"


class RunFailed(Exception):
  """A run stopped by a fault, not by bad input: the message says in which stage, why, and what
  this run left in the journal (so the user knows whether a rerun resumes anything)."""

  def __init__(self, stage: str, error: BaseException, journaled: int):
    self.interrupted = isinstance(error, KeyboardInterrupt)
    cause = "" if self.interrupted else ": " + (
        str(error) if isinstance(error, FatalApiError) else f"{type(error).__name__}: {error}")
    kept = (f"{journaled} result(s) of this run are journaled: rerun the same command to resume"
            if journaled else "nothing of this run was journaled")
    super().__init__(f"while {stage}{cause}; {kept}")


def run(faces: Sequence[fairface.Face], bad_rows: Sequence[fairface.BadRow],
        backend: Backend, options: RunOptions) -> dict[str, object]:
  """Resumes or starts the run in `options.out`; returns the report (also in report.json).

  Raises CliError for a stale journal under `--stale refuse` and RunFailed for any fault.
  """
  start = time.time()
  progress = _Progress(options.progress)
  stage = f"opening the journal in {options.out}"
  try:
    os.makedirs(os.path.join(options.out, ".journal"), exist_ok=True)
    with _exclusive(options.out), Journal(os.path.join(options.out, JOURNAL_FILE)) as journal:
      requests = fingerprinted(build_requests(faces, options.attributes, options.prompt_set),
                               backend)
      made_from = journal.final_inputs()
      pending = [r for r in requests if r.key not in made_from or made_from[r.key] != r.inputs]
      stale = [r for r in pending if r.key in made_from]
      if stale and options.stale == "refuse":
        raise CliError(f"{len(stale)} journaled answer(s) in {options.out} were made from other"
                       " inputs than this run's (a label, the prompts, the model or the image"
                       f" changed; first: {stale[0].image_id} {stale[0].attribute}); rerun with"
                       " --stale redo to ask again")
      stage = "requesting answers"
      asyncio.run(_answer(backend, pending, journal, options, progress))
      stage = f"writing the dataset in {options.out}"
      keys = [r.key for r in requests]
      inputs = {r.key: r.inputs for r in requests}
      answers = {key: r for r in journal.rows("ok")
                 if inputs.get(key := (r["image_id"], r["attribute"])) == r["inputs"]}
      splits = _write(faces, answers, options)
      totals = journal.summary(keys)
      failed_rows = [r for r in journal.rows("failed") if (r["image_id"], r["attribute"]) in inputs]
      cost = _estimate_cost(journal.rows(), set(keys), options.model)
    written = sum(splits.values())
    report = {
        "backend": backend.name, "model": options.model, "images": len(faces),
        "attributes": list(options.attributes), "expected": len(requests),
        "already_done": len(requests) - len(pending), "requested": len(pending),
        "redone": len(stale),
        "written": written, "refused": totals["refused"], "failed": totals["failed"],
        "unanswered": len(requests) - written - totals["refused"] - totals["failed"],
        "failures_by_cause": dict(collections.Counter(r["error"] for r in failed_rows)
                                  .most_common()),
        "splits": splits, "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"], "estimated_cost_usd": cost,
        "bad_images": [b.as_dict() for b in bad_rows], "skipped_rows": len(bad_rows),
        "run": progress.counts, "elapsed_s": round(time.time() - start, 3),
    }
    stage = f"writing {os.path.join(options.out, 'report.json')}"
    tfds_writer.write_json(os.path.join(options.out, "report.json"), report)
  except CliError:
    raise
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except  (reported, not hidden)
    raise RunFailed(stage, e, progress.counts["journaled"]) from e
  return report


def _write(faces: Sequence[fairface.Face], answers: dict[tuple[str, str], dict[str, object]],
           options: RunOptions) -> dict[str, int]:
  """The dataset of every journaled answer of this run's requests; its record count per split."""
  items = []
  for face in faces:
    qa = [tfds_writer.QA(a, options.prompt_set.question[a], answers[k]["answer"],
                         answers[k]["source"])
          for a in options.attributes if (k := (face.image_id, a)) in answers]
    if qa:
      items.append(tfds_writer.ImageQA(face.image_id, face.path, face.labels, qa))
  if not items:
    return {}
  split_of = tfds_writer.assign_splits([i.image_id for i in items], options.seed,
                                       options.val_fraction)
  return tfds_writer.write_dataset(
      options.out, items, split_of,
      description=f"FairFaceGPT-style attribute QA, {len(options.attributes)} attributes.")


class _Progress:
  """This run's counts and its progress line; failed attempts that will be retried show up as
  they happen (a count and the last cause on the bar; each new cause once on stderr), so a run
  against a dead endpoint does not look like a slow one."""

  SHOWN_CAUSES = 5  # distinct retry causes printed as lines; more are only counted

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self.counts: dict[str, object] = {"requested": 0, "ok": 0, "refused": 0, "failed": 0,
                                      "unanswered": 0, "journaled": 0, "prompt_tokens": 0,
                                      "completion_tokens": 0, "failures": {}, "retries": {}}
    self.bar = None
    self._last_cause = ""

  def start(self, total: int) -> None:
    self.counts["requested"] = self.counts["unanswered"] = total
    self.bar = tqdm.tqdm(total=total, unit="req", desc="generate", disable=not self.enabled,
                         mininterval=0.5, dynamic_ncols=True)

  def done(self, result: Result) -> None:
    self.counts[result.status] += 1
    if result.status == "failed":
      self.counts["failures"][result.error] = self.counts["failures"].get(result.error, 0) + 1
    self.counts["prompt_tokens"] += result.prompt_tokens
    self.counts["completion_tokens"] += result.completion_tokens
    self.counts["unanswered"] -= 1
    self._show()
    self.bar.update(1)

  def retrying(self, request: Request | None, reason: str) -> None:
    retries = self.counts["retries"]
    if reason not in retries and len(retries) < self.SHOWN_CAUSES:
      what = f"{request.image_id} {request.attribute}" if request else "the batch API"
      tqdm.tqdm.write(f"generate: {what}: {reason}; retrying (the progress line counts retries)",
                      file=sys.stderr)
    retries[reason] = retries.get(reason, 0) + 1
    self._last_cause = reason
    self._show()
    self.bar.refresh()

  def _show(self) -> None:
    postfix = {"refused": self.counts["refused"], "failed": self.counts["failed"]}
    if self.counts["retries"]:
      postfix.update(retries=sum(self.counts["retries"].values()), last=self._last_cause[:80])
    self.bar.set_postfix(postfix, refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


async def _answer(backend: Backend, pending: Sequence[Request], journal: Journal,
                  options: RunOptions, progress: _Progress) -> None:
  """Runs the backend; each result is journaled (durably) before it is counted."""
  waiting = {r.key: r.inputs for r in pending}
  progress.start(len(pending))

  def emit(result: Result) -> None:
    result = _scrub(result, options.secret)
    # Journal even results this run did not ask for: they were paid for, the journal's key
    # makes a duplicate impossible, and with unknown inputs a rerun does not trust them.
    if journal.record(result, backend.name, waiting.get(result.key)):
      progress.counts["journaled"] += 1
    if waiting.pop(result.key, None) is not None:
      progress.done(result)

  def retrying(request: Request | None, reason: str) -> None:
    progress.retrying(request, _redact(reason, options.secret))

  try:
    if pending:
      outcome = backend.run(pending, emit, journal, retrying)
      if inspect.isawaitable(outcome):
        await outcome
  finally:
    progress.close()


def _scrub(result: Result, secret: str | None) -> Result:
  if not secret:
    return result
  return dataclasses.replace(result, answer=_redact(result.answer, secret),
                             error=_redact(result.error, secret))


def _estimate_cost(rows: Sequence[dict[str, object]], keys: set[tuple[str, str]],
                   model: str | None) -> float | None:
  """List-price cost of the tokens billed for `keys`, per price (chat or Batch); None if the
  model's price is unknown."""
  billed: dict[bool, list[int]] = {}
  for row in rows:
    batch = _BATCH_PRICED.get(row["source"])
    if batch is not None and (row["image_id"], row["attribute"]) in keys:
      tokens = billed.setdefault(batch, [0, 0])
      tokens[0] += row["prompt_tokens"]
      tokens[1] += row["completion_tokens"]
  if not billed:
    return 0.0  # offline or imported: nothing was paid for
  if model is None:
    return None
  from data_gen.backends import pricing
  costs = [pricing.estimate_cost_usd(model, p, c, batch) for batch, (p, c) in billed.items()]
  return None if None in costs else round(sum(costs), 6)


@contextlib.contextmanager
def _exclusive(out: str):
  """An advisory lock on OUT: two runs on one journal would pay twice for the same work."""
  fd = os.open(os.path.join(out, ".journal", "lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise CliError(f"another run is already writing to {out}") from None
    yield
  finally:
    os.close(fd)


def build_parser() -> OneLineParser:
  p = OneLineParser(prog="python -m data_gen generate", description=__doc__.split("\n")[0])
  p.add_argument("--labels", required=True, help="FairFace label CSV (file,age,gender,race,"
                 "service_test[,extra ground-truth columns])")
  p.add_argument("--images", required=True, help="image root; the CSV's `file` is relative")
  p.add_argument("--out", required=True, help="output: TFDS dataset + report.json + journal")
  p.add_argument("--backend", choices=("offline", "openai", "openai-batch"), default="offline")
  p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL") or None,
                 help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
  p.add_argument("--model", default=DEFAULT_MODEL)
  p.add_argument("--concurrency", type=int, default=16, help="requests in flight (chat)")
  p.add_argument("--limit", type=int, help="use only the first N usable images of the CSV")
  p.add_argument("--attributes", help=f"comma list of {','.join(prompts.ATTRIBUTES)} (all)")
  p.add_argument("--seed", type=int, default=0, help="offline phrasing and train/val split")
  p.add_argument("--prompts", help="JSON file overriding system/user prompts, questions,"
                 " refusal_phrases")
  p.add_argument("--stale", choices=("redo", "refuse"), default="redo",
                 help="a journaled answer made from other inputs (labels, prompts, model, image)"
                 " than this run's: ask again (default) or stop before any request")
  p.add_argument("--val-fraction", type=float, default=0.0,
                 help="share of images (not QA pairs) in the validation split")
  p.add_argument("--max-retries", type=int, default=8, help="per request (chat backend)")
  p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (chat)")
  p.add_argument("--image-max-side", type=int, help="downscale images sent to the API")
  p.add_argument("--poll-interval", type=float, default=30.0, help="seconds (batch backend)")
  p.add_argument("--offline-delay", type=float, default=0.0,
                 help="seconds per offline answer, to watch or interrupt a run in flight")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def _check_numbers(args: argparse.Namespace) -> None:
  if args.concurrency < 1:
    raise CliError(f"--concurrency must be >= 1, got {args.concurrency}")
  if args.limit is not None and args.limit < 1:
    raise CliError(f"--limit must be >= 1, got {args.limit}")
  if not 0.0 <= args.val_fraction < 1.0:
    raise CliError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
  if args.offline_delay < 0 or args.timeout <= 0 or args.poll_interval <= 0:
    raise CliError("--offline-delay must be >= 0; --timeout and --poll-interval > 0")
  if args.max_retries < 0:
    raise CliError(f"--max-retries must be >= 0, got {args.max_retries}")
  if args.image_max_side is not None and args.image_max_side < 1:
    raise CliError(f"--image-max-side must be >= 1 pixel, got {args.image_max_side}")


def make_backend(args: argparse.Namespace, api_key: str | None,
                 prompt_set: prompts.PromptSet) -> Backend:
  """The backend for `--backend`; the OpenAI ones are imported only when asked for."""
  if args.backend == "offline":
    return OfflineBackend(seed=args.seed, delay=args.offline_delay)
  try:
    if args.backend == "openai":
      from data_gen.backends.openai_chat import OpenAIChatBackend
      return OpenAIChatBackend(
          model=args.model, api_key=api_key, base_url=args.base_url,
          concurrency=args.concurrency, max_retries=args.max_retries,
          refusal_phrases=prompt_set.refusal_phrases, image_max_side=args.image_max_side,
          timeout=args.timeout)
    from data_gen.backends.openai_batch import OpenAIBatchBackend
    return OpenAIBatchBackend(model=args.model, api_key=api_key, base_url=args.base_url,
                              poll_interval=args.poll_interval, max_retries=args.max_retries,
                              refusal_phrases=prompt_set.refusal_phrases,
                              image_max_side=args.image_max_side)
  except ImportError as e:
    raise CliError(f"--backend {args.backend} is not available here ({e})") from e


def main(argv: Sequence[str] | None = None) -> int:
  api_key = None
  try:
    args = build_parser().parse_args(argv)
    _check_numbers(args)
    if args.backend != "offline":
      api_key = os.environ.get("OPENAI_API_KEY", "").strip() or None
      if api_key is None:
        raise CliError(f"--backend {args.backend} needs an API key in the OPENAI_API_KEY"
                       " environment variable")
    prompt_set = prompts.load_prompts(args.prompts)
    attributes = prompts.parse_attributes(args.attributes)
    check_out_dir(args.out, resumable=OUTPUT_MARKERS)
    faces, bad = fairface.read_labels(args.labels, args.images, progress=not args.no_progress)
    if args.limit is not None:
      faces = faces[:args.limit]
    if not faces:
      raise CliError(f"{args.labels}: no usable images ({len(bad)} bad rows, first:"
                     f" {bad[0].as_dict() if bad else 'none'})")
    backend = make_backend(args, api_key, prompt_set)
    options = RunOptions(args.out, attributes, prompt_set, args.seed, args.val_fraction,
                         model=None if args.backend == "offline" else args.model,
                         secret=api_key, progress=not args.no_progress, stale=args.stale)
    report = run(faces, bad, backend, options)
  except (CliError, fairface.LabelsError, prompts.PromptsError) as e:
    print(f"error: {_redact(str(e), api_key)}", file=sys.stderr)
    return 2
  except RunFailed as e:  # never a traceback: one could carry the key
    print(f"{'interrupted' if e.interrupted else 'error:'} {_redact(str(e), api_key)}",
          file=sys.stderr)
    return 130 if e.interrupted else 1
  except KeyboardInterrupt:
    print("interrupted before any request; nothing was journaled", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except  (before the run: nothing journaled)
    print(f"error: {type(e).__name__}: {_redact(str(e), api_key)}", file=sys.stderr)
    return 1
  for row in bad:
    print(row.skipped(args.labels), file=sys.stderr)
  ran = report["run"]
  if ran["requested"] and ran["failed"] == ran["requested"]:
    (cause, count), *others = sorted(ran["failures"].items(), key=lambda kv: -kv[1])
    more = f" and {len(others)} other cause(s)" if others else ""
    print(f"error: all {ran['requested']} requests of this run failed, {count} with: {cause}"
          f"{more}; no answer was journaled (causes in {args.out}/report.json); rerun the same"
          " command to retry them", file=sys.stderr)
    return 1
  redone = f" ({report['redone']} redone: made from other inputs)" if report["redone"] else ""
  causes = "".join(f"; {n} failed with: {c}" for c, n in ran["failures"].items())
  print(f"wrote {report['written']} QA pairs ({report['splits']}) to {args.out}; requested"
        f" {report['requested']}{redone}, refused {report['refused']}, failed"
        f" {report['failed']}, skipped rows {report['skipped_rows']}{causes}", file=sys.stderr)
  return 0


def _redact(text: str | None, secret: str | None) -> str | None:
  return text.replace(secret, "[redacted]") if secret and text else text
