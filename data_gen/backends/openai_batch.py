"""OpenAI Batch API backend: the chat requests at half the price, resumable across restarts.

Each round writes the pending requests as JSONL (split to stay within the API's per-batch
limits), uploads each file (purpose "batch"), creates its batch, polls it to the end,
downloads the output and error files and matches their lines to requests by `custom_id`.
Items that failed or were refused go into the next round, up to the retry limits, so every
request ends in exactly one Result.

Spending happens once: the uploaded file id is journaled (in `meta`) before its batch is
created and the batch id right after. A restarted run -- a fresh backend on the same journal --
first finishes the journaled batches, and for a file whose create call died unanswered it
looks for the batch the server did create, instead of paying for the same requests twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Awaitable, Callable, Sequence, TypeVar

import openai
from openai.types import Batch
from PIL import Image

from data_gen.backends.base import (Emit, FatalApiError, MetaStore, Request, Result, Retrying,
                                    unheard)
from data_gen.backends.openai_chat import (
    DEFAULT_REFUSAL_PHRASES, RETRYABLE_STATUSES, Backoff, MalformedResponse, answer_inputs,
    call_emit, chat_messages, classify_error, image_data_uri, parse_reply, redact)

log = logging.getLogger(__name__)

JOURNAL_KEY = "openai_batch.batches"  # JSON list of {"input_file_id", "batch_id", "since"}
ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_T = TypeVar("_T")


@dataclasses.dataclass
class _Item:
  request: Request
  done: bool = False
  attempts: int = 0
  failures: int = 0
  refusals: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0

  def result(self, status: str, answer: str | None = None, error: str | None = None) -> Result:
    return Result(self.request.image_id, self.request.attribute, status, answer,
                  self.prompt_tokens, self.completion_tokens, self.attempts, error)


class OpenAIBatchBackend:
  """Answers requests through /v1/batches; `run` emits exactly one Result per request."""

  name = "openai-batch"

  def __init__(self, model: str, api_key: str, base_url: str | None, poll_interval: float = 30.0,
               max_item_retries: int = 2, *, refusal_phrases: Sequence[str] | None = None,
               max_refusal_retries: int = 2, image_max_side: int | None = None,
               max_batch_requests: int = 50_000, max_batch_bytes: int = 190 * 2**20,
               max_retries: int = 8, backoff_base: float = 1.0, backoff_max: float = 60.0,
               timeout: float = 600.0):
    if not api_key:
      raise ValueError("the openai-batch backend needs an API key in OPENAI_API_KEY; "
                       "none was given")
    self.model = model
    self.base_url = base_url
    self.poll_interval = poll_interval
    self.max_item_retries = max_item_retries
    self.refusal_phrases = tuple(refusal_phrases or DEFAULT_REFUSAL_PHRASES)
    self.max_refusal_retries = max_refusal_retries
    self.image_max_side = image_max_side
    self.max_batch_requests = max_batch_requests
    self.max_batch_bytes = max_batch_bytes
    self.max_retries = max_retries
    self.backoff = Backoff(backoff_base, backoff_max)
    self.timeout = timeout
    self._api_key = api_key
    self._where = base_url or "api.openai.com"
    self._retrying: Retrying = unheard

  def __repr__(self) -> str:
    return f"OpenAIBatchBackend(model={self.model!r}, base_url={self.base_url!r})"

  def answer_inputs(self, request: Request) -> dict[str, object]:
    return answer_inputs(request, self.model, self.image_max_side)

  async def run(self, requests: Sequence[Request], emit: Emit, meta: MetaStore,
                retrying: Retrying | None = None) -> None:
    self._retrying = retrying or unheard
    items = {r.custom_id: _Item(r) for r in requests}
    client = openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                timeout=self.timeout)
    try:
      records = json.loads(meta.get(JOURNAL_KEY) or "[]")
      for record in list(records):  # batches a previous run paid for: finish them first
        if record["batch_id"] is None:
          batch = await self._call("list batches", lambda: self._find_batch(client, record))
          if batch is None:  # its create call never reached the server: nothing was spent
            records.remove(record)
            meta.set(JOURNAL_KEY, json.dumps(records))
            continue
          record["batch_id"] = batch.id
          meta.set(JOURNAL_KEY, json.dumps(records))
        log.info("resuming journaled batch %s", record["batch_id"])
        await self._finish(client, record, None, items, emit, meta, records)
      while pending := [item for item in items.values() if not item.done]:
        for record, members in await self._submit(client, pending, emit, meta, records):
          await self._finish(client, record, members, items, emit, meta, records)
    finally:
      await client.close()

  # Submitting.
  async def _submit(self, client: openai.AsyncOpenAI, pending: list[_Item], emit: Emit,
                    meta: MetaStore, records: list[dict]) -> list[tuple[dict, set[str]]]:
    """Uploads and starts the pending items as one or more batches (within the size limits)."""
    started, lines, members, size = [], [], set(), 0
    for item in pending:
      try:
        line = self._jsonl_line(item.request)
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        item.done = True
        await call_emit(emit, item.result("failed", error=f"cannot read image "
                                          f"{item.request.image_path}: {e}"))
        continue
      if members and (len(members) >= self.max_batch_requests
                      or size + len(line) > self.max_batch_bytes):
        started.append(await self._start(client, b"".join(lines), members, meta, records))
        lines, members, size = [], set(), 0
      lines.append(line)
      members.add(item.request.custom_id)
      size += len(line)
    if members:
      started.append(await self._start(client, b"".join(lines), members, meta, records))
    return started

  def _jsonl_line(self, request: Request) -> bytes:
    image_url = image_data_uri(request.image_path, self.image_max_side)
    body = {"model": self.model, "messages": chat_messages(request, image_url)}
    line = {"custom_id": request.custom_id, "method": "POST", "url": ENDPOINT, "body": body}
    return (json.dumps(line) + "\n").encode()

  async def _start(self, client: openai.AsyncOpenAI, data: bytes, members: set[str],
                   meta: MetaStore, records: list[dict]) -> tuple[dict, set[str]]:
    upload = await self._call("upload the batch input", lambda: client.files.create(
        file=("facellm_batch.jsonl", data, "application/jsonl"), purpose="batch"))
    record = {"input_file_id": upload.id, "batch_id": None, "since": time.time()}
    records.append(record)
    meta.set(JOURNAL_KEY, json.dumps(records))  # before create: a crash now can be resolved
    batch = await self._create_batch(client, record)
    record["batch_id"] = batch.id
    meta.set(JOURNAL_KEY, json.dumps(records))
    log.info("started batch %s with %d requests (%d bytes)", batch.id, len(members), len(data))
    return record, members

  async def _create_batch(self, client: openai.AsyncOpenAI, record: dict) -> Batch:
    """Creates the batch once: after an unanswered try it first looks for the one made."""
    failures = 0
    while True:
      if failures:
        found = await self._call("list batches", lambda: self._find_batch(client, record))
        if found is not None:
          return found
      try:
        return await client.batches.create(
            input_file_id=record["input_file_id"], endpoint=ENDPOINT, completion_window="24h",
            metadata={"source": "facellm-jax data_gen"})
      except openai.APIError as e:
        failure = classify_error(e, self._api_key, self._where)
        failures += 1
        if not failure.retryable or failures > self.max_retries:
          raise FatalApiError(
              f"could not create a batch at {self._where}: {failure.reason}") from None
        self._retrying(None, f"create a batch: {failure.reason}")
        await asyncio.sleep(self.backoff.delay(failures, failure.retry_after))

  async def _find_batch(self, client: openai.AsyncOpenAI, record: dict) -> Batch | None:
    async for batch in client.batches.list(limit=100):  # newest first
      if batch.input_file_id == record["input_file_id"]:
        return batch
      if batch.created_at < record["since"] - 3600:  # an hour's slack for clock skew
        return None
    return None

  # Collecting.
  async def _finish(self, client: openai.AsyncOpenAI, record: dict, members: set[str] | None,
                    items: dict[str, _Item], emit: Emit, meta: MetaStore,
                    records: list[dict]) -> None:
    """Waits for a batch, settles the items it answered, then drops it from the journal.

    `members` is None for a batch journaled by an earlier run; its unanswered items are then
    simply submitted again, without counting a failed attempt.
    """
    batch = await self._wait(client, record["batch_id"])
    seen = set()
    if batch is None:  # the server no longer knows it (another account or base URL?)
      log.warning("journaled batch %s is gone; its requests will be submitted again",
                  record["batch_id"])
      records.remove(record)
      meta.set(JOURNAL_KEY, json.dumps(records))
      return
    for line in await self._download(client, batch):
      item = items.get(line.get("custom_id"))
      if item is None or item.done or item.request.custom_id in seen:
        continue
      seen.add(item.request.custom_id)
      await self._settle(item, line, emit)
    if batch.status == "failed":
      errors = batch.errors.data if batch.errors and batch.errors.data else []
      detail = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
      reason = redact(f"batch {batch.id} failed ({detail})", self._api_key)
    else:
      reason = f"no result in batch {batch.id} (ended {batch.status})"
    for custom_id in (members or set()) - seen:
      item = items[custom_id]
      if not item.done:
        item.attempts += 1
        # A cancelled batch was stopped on purpose (e.g. from the dashboard): do not resubmit.
        await self._failed_attempt(item, reason, batch.status != "cancelled", emit)
    records.remove(record)
    meta.set(JOURNAL_KEY, json.dumps(records))

  async def _settle(self, item: _Item, line: dict, emit: Emit) -> None:
    item.attempts += 1
    response = line.get("response") or {}
    status = response.get("status_code")
    if status == 200:
      try:
        reply = parse_reply(response.get("body"), self.refusal_phrases)
      except MalformedResponse as e:
        await self._failed_attempt(item, f"malformed response: {e}", True, emit)
        return
      item.prompt_tokens += reply.prompt_tokens
      item.completion_tokens += reply.completion_tokens
      if reply.refusal is None:
        item.done = True
        await call_emit(emit, item.result("ok", reply.text))
        return
      item.refusals += 1
      if item.refusals > self.max_refusal_retries:
        item.done = True
        await call_emit(emit, item.result(
            "refused", error=f"refused {item.refusals} times: "
            f"{redact(reply.refusal, self._api_key)}"))
      return
    error = line.get("error") or {}
    body = response.get("body")
    if not error and isinstance(body, dict) and isinstance(body.get("error"), dict):
      error = body["error"]
    message = f"{error.get('code') or 'error'}: {error.get('message') or 'no message'}"
    if status is not None:
      message = f"HTTP {status}: {message}"
    retryable = status is None or status in RETRYABLE_STATUSES or status >= 500
    await self._failed_attempt(item, redact(message, self._api_key)[:300], retryable, emit)

  async def _failed_attempt(self, item: _Item, reason: str, retryable: bool, emit: Emit) -> None:
    item.failures += 1
    if not retryable or item.failures > self.max_item_retries:
      item.done = True
      await call_emit(emit, item.result("failed", error=reason))
    else:
      self._retrying(item.request, reason)

  async def _wait(self, client: openai.AsyncOpenAI, batch_id: str) -> Batch | None:
    while True:
      batch = await self._call(f"poll batch {batch_id}", lambda: client.batches.retrieve(batch_id),
                               missing_ok=True)
      if batch is None or batch.status in TERMINAL:
        return batch
      counts = batch.request_counts
      log.info("batch %s %s: %s/%s done", batch_id, batch.status,
               counts.completed if counts else "?", counts.total if counts else "?")
      await asyncio.sleep(self.poll_interval)

  async def _download(self, client: openai.AsyncOpenAI, batch: Batch) -> list[dict]:
    """The lines of the output and error files; a file the server deleted counts as empty."""
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
      if not file_id:
        continue
      content = await self._call(f"download {file_id}", lambda: client.files.content(file_id),
                                 missing_ok=True)
      if content is None:
        log.warning("%s of batch %s is gone; its requests will be retried", file_id, batch.id)
        continue
      for number, text in enumerate(content.content.decode().splitlines(), 1):
        if not text.strip():
          continue
        try:
          lines.append(json.loads(text))
        except json.JSONDecodeError:
          log.warning("%s line %d is not JSON; its request will be retried", file_id, number)
    return lines

  async def _call(self, what: str, fn: Callable[[], Awaitable[_T]],
                  missing_ok: bool = False) -> _T | None:
    """A control-plane call (upload, poll, download) retried like a chat request.

    With `missing_ok`, a 404 returns None: a journaled batch or file may have been deleted.
    """
    failures = 0
    while True:
      try:
        return await fn()
      except openai.NotFoundError:
        if not missing_ok:
          raise FatalApiError(f"could not {what} at {self._where}: not found (HTTP 404)") from None
        return None
      except openai.APIError as e:
        failure = classify_error(e, self._api_key, self._where)
        failures += 1
        if not failure.retryable or failures > self.max_retries:
          raise FatalApiError(f"could not {what} at {self._where}: {failure.reason}") from None
        log.info("%s: %s; retrying", what, failure.reason)
        self._retrying(None, f"{what}: {failure.reason}")
        await asyncio.sleep(self.backoff.delay(failures, failure.retry_after))
