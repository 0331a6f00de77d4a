"""OpenAI chat-completions backend: many requests in flight, each retried until it is final.

A full FairFaceGPT run is 87,632 paid requests, so this backend is built to spend the budget
once: it keeps `concurrency` requests in flight, retries transient failures (429, 5xx,
timeouts, dropped connections, malformed bodies) with exponential backoff and jitter, honours
the server's Retry-After (a 429's wait holds back every worker, since rate limits are
per-account), re-asks refusals a bounded number of times and records them as "refused", and
stops the whole run on errors that no retry can fix (a rejected key, an exhausted quota).

Works with any OpenAI-compatible server (`base_url`: OpenAI, gateways, vLLM). The helpers
below (message building, reply parsing, refusal detection, error classification) are shared
with the Batch backend.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import inspect
import io
import json
import logging
import random
import re
import time
from typing import Mapping, Sequence

import openai
from PIL import Image

from data_gen.backends.base import (Emit, FatalApiError, MetaStore, Request, Result, Retrying,
                                    file_sha256, unheard)
from facellm_jax.input import image as image_lib

log = logging.getLogger(__name__)

DEFAULT_REFUSAL_PHRASES = (
    "I'm sorry", "I am sorry", "I apologize", "I can't help", "I cannot help", "I can't assist",
    "I cannot assist", "I'm unable to", "I am unable to", "I can't comply", "I cannot comply",
)
# A refusal says so up front; the same words deep inside a long description are a hedge
# ("... I'm unable to see the ears"), not a refusal.
REFUSAL_WINDOW = 120
RETRY_AFTER_CAP = 900.0  # never sleep longer than this on a server's say-so
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})  # and every 5xx; other 4xx are final
_JPEG_MAGIC = b"\xff\xd8\xff"


class MalformedResponse(ValueError):
  """A 200 response whose body is not a usable chat completion."""


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str | None  # the answer; None when the model refused
  refusal: str | None  # why this counts as a refusal (the refusal text itself, shortened)
  prompt_tokens: int
  completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failure:
  retryable: bool
  reason: str
  retry_after: float | None = None  # the server's requested wait, in seconds
  rate_limited: bool = False


def _normalize(text: str) -> str:
  return text.replace("\u2019", "'").replace("\u2018", "'").casefold()


def is_refusal(text: str, phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES) -> bool:
  head = _normalize(text.strip()[:REFUSAL_WINDOW])
  return any(_normalize(p) in head for p in phrases)


def image_data_uri(path: str, max_side: int | None = None) -> str:
  """The image as a base64 JPEG data URI; JPEG files go unchanged unless they must shrink."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:3] != _JPEG_MAGIC or max_side is not None:
    data = _as_jpeg(data, max_side)
  return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _as_jpeg(data: bytes, max_side: int | None) -> bytes:
  with Image.open(io.BytesIO(data)) as image:
    too_big = max_side is not None and max(image.size) > max_side
    if data[:3] == _JPEG_MAGIC and not too_big:
      return data
    image = image_lib.rgb_image(image)
    if too_big:
      image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def answer_inputs(request: Request, model: str, image_max_side: int | None) -> dict[str, object]:
  """What a chat answer is made from, for both OpenAI backends (so a run may switch between
  them): the prompts (the labels are in the user prompt), the image bytes, the model and the
  downscaling of what is uploaded."""
  return {"system": request.system_prompt, "user": request.user_prompt,
          "image": file_sha256(request.image_path), "model": model,
          "image_max_side": image_max_side}


def chat_messages(request: Request, image_url: str) -> list[dict]:
  return [
      {"role": "system", "content": request.system_prompt},
      {"role": "user", "content": [
          {"type": "text", "text": request.user_prompt},
          {"type": "image_url", "image_url": {"url": image_url}},
      ]},
  ]


def parse_reply(body: object, refusal_phrases: Sequence[str]) -> Reply:
  """Reads a chat completion body (a decoded JSON dict); raises MalformedResponse."""
  try:
    choice = body["choices"][0]
    message = choice["message"]
    content = message.get("content")
    usage = body.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
  except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
    raise MalformedResponse(f"not a chat completion ({type(e).__name__}: {e})") from None
  if content is not None and not isinstance(content, str):
    raise MalformedResponse(f"message content is {type(content).__name__}, expected a string")
  refusal = None
  if message.get("refusal"):
    refusal = str(message["refusal"])
  elif choice.get("finish_reason") == "content_filter":
    refusal = "blocked by the content filter"
  elif not content or not content.strip():
    refusal = "empty answer"
  elif is_refusal(content, refusal_phrases):
    refusal = content
  if refusal is not None:
    return Reply(None, refusal[:REFUSAL_WINDOW], prompt_tokens, completion_tokens)
  return Reply(content.strip(), None, prompt_tokens, completion_tokens)


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
  """The wait a response asks for: retry-after-ms, or Retry-After in seconds or as an HTTP-date."""
  if not headers:
    return None
  if (ms := headers.get("retry-after-ms")) is not None:
    try:
      return max(0.0, float(ms) / 1000)
    except ValueError:
      pass
  value = headers.get("retry-after")
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def redact(text: str, api_key: str) -> str:
  """Removes the key (and anything shaped like a secret key) from text bound for logs/errors."""
  if api_key:
    text = text.replace(api_key, "[redacted]")
  return re.sub(r"sk-[A-Za-z0-9_\-*.]{6,}", "sk-[redacted]", text)


def _server_message(error: openai.APIStatusError) -> str:
  body = error.body
  if isinstance(body, dict) and isinstance(body.get("error"), dict):
    body = body["error"]
  if isinstance(body, dict) and body.get("message"):
    return str(body["message"])
  return error.message


def classify_error(error: Exception, api_key: str, where: str) -> Failure:
  """Sorts an exception from an API call into retryable or final; raises FatalApiError."""
  if isinstance(error, openai.APIStatusError):
    status = error.status_code
    code = getattr(error, "code", None)
    if status == 401:
      raise FatalApiError(f"the server at {where} rejected the API key (HTTP 401); "
                          "check OPENAI_API_KEY") from None
    if status == 429 and code == "insufficient_quota":
      raise FatalApiError(f"the account behind OPENAI_API_KEY has no quota left at {where} "
                          "(HTTP 429 insufficient_quota); add credit and rerun to resume") from None
    reason = redact(f"HTTP {status}: {_server_message(error)}", api_key)[:300]
    retryable = status in RETRYABLE_STATUSES or status >= 500
    return Failure(retryable, reason, retry_after_seconds(error.response.headers),
                   rate_limited=status == 429)
  if isinstance(error, openai.APITimeoutError):
    return Failure(True, "request timed out")
  if isinstance(error, openai.APIConnectionError):
    cause = _root_cause(error)
    detail = f": {type(cause).__name__}: {cause}" if cause is not error else ""
    return Failure(True, redact(f"connection failed{detail} ({where})", api_key)[:300])
  if isinstance(error, (MalformedResponse, json.JSONDecodeError, UnicodeDecodeError)):
    return Failure(True, redact(f"malformed response: {error}", api_key)[:300])
  raise error


def _root_cause(error: BaseException) -> BaseException:
  """The innermost exception behind `error` (e.g. ConnectionRefusedError behind httpx's "All
  connection attempts failed"): the one that says what went wrong."""
  seen = {id(error)}
  while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
    seen.add(id(inner))
    error = inner
  return error


@dataclasses.dataclass(frozen=True)
class Backoff:
  """Exponential backoff with jitter; a server's Retry-After wins when it is given."""

  base: float = 1.0
  ceiling: float = 60.0

  def delay(self, failures: int, retry_after: float | None = None) -> float:
    if retry_after is not None:
      retry_after = min(retry_after, RETRY_AFTER_CAP)
      return retry_after + random.uniform(0, min(0.1 * retry_after, self.base))
    cap = min(self.ceiling, self.base * 2 ** (failures - 1))
    return cap / 2 + random.uniform(0, cap / 2)


async def call_emit(emit: Emit, result: Result) -> None:
  outcome = emit(result)
  if inspect.isawaitable(outcome):
    await outcome


class OpenAIChatBackend:
  """One chat completion per request; `run` emits exactly one Result per request."""

  name = "openai"

  def __init__(self, model: str, api_key: str, base_url: str | None, concurrency: int,
               max_retries: int = 8, refusal_phrases: Sequence[str] | None = None,
               max_refusal_retries: int = 2, image_max_side: int | None = None,
               timeout: float = 60.0, backoff_base: float = 1.0, backoff_max: float = 60.0):
    if not api_key:
      raise ValueError("the openai backend needs an API key in OPENAI_API_KEY; none was given")
    if concurrency < 1:
      raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    self.model = model
    self.base_url = base_url
    self.concurrency = concurrency
    self.max_retries = max_retries
    self.refusal_phrases = tuple(refusal_phrases or DEFAULT_REFUSAL_PHRASES)
    self.max_refusal_retries = max_refusal_retries
    self.image_max_side = image_max_side
    self.timeout = timeout
    self.backoff = Backoff(backoff_base, backoff_max)
    self._api_key = api_key
    self._resume_at = 0.0  # monotonic time before which no worker sends (a 429's Retry-After)
    self._retrying: Retrying = unheard

  def __repr__(self) -> str:
    return f"OpenAIChatBackend(model={self.model!r}, base_url={self.base_url!r})"

  def answer_inputs(self, request: Request) -> dict[str, object]:
    return answer_inputs(request, self.model, self.image_max_side)

  async def run(self, requests: Sequence[Request], emit: Emit, meta: MetaStore,
                retrying: Retrying | None = None) -> None:
    del meta  # each request is final once emitted; the driver's journal is the resume point
    self._retrying = retrying or unheard
    client = openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                timeout=self.timeout)
    pending = iter(requests)

    async def worker() -> None:
      for request in pending:  # one shared iterator: each request is taken by one worker
        await call_emit(emit, await self.answer(client, request))

    workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(requests)))]
    try:
      await asyncio.gather(*workers)
    finally:
      for task in workers:
        task.cancel()
      await asyncio.gather(*workers, return_exceptions=True)
      await client.close()

  async def answer(self, client: openai.AsyncOpenAI, request: Request) -> Result:
    """Asks until the answer is final; counts every attempt and all billed tokens."""
    def fail(attempts: int, error: str, **tokens: int) -> Result:
      return Result(request.image_id, request.attribute, "failed", attempts=attempts, error=error,
                    **tokens)

    try:
      image_url = image_data_uri(request.image_path, self.image_max_side)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      return fail(0, f"cannot read image {request.image_path}: {e}")
    messages = chat_messages(request, image_url)
    where = self.base_url or "api.openai.com"
    attempts = failures = refusals = prompt_tokens = completion_tokens = 0
    while True:
      await self._wait_for_rate_limit()
      attempts += 1
      try:
        raw = await client.chat.completions.with_raw_response.create(
            model=self.model, messages=messages)
        reply = parse_reply(json.loads(raw.content), self.refusal_phrases)
      except (openai.APIError, MalformedResponse, ValueError) as e:
        failure = classify_error(e, self._api_key, where)
        failures += 1
        tokens = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        if not failure.retryable:
          return fail(attempts, failure.reason, **tokens)
        if failures > self.max_retries:  # the attempts are in the result, the cause is the error
          return fail(attempts, failure.reason, **tokens)
        delay = self.backoff.delay(failures, failure.retry_after)
        if failure.rate_limited and failure.retry_after is not None:
          self._resume_at = max(self._resume_at, time.monotonic() + delay)
        log.info("%s %s: %s; retrying in %.2fs", request.image_id, request.attribute,
                 failure.reason, delay)
        self._retrying(request, failure.reason)
        await asyncio.sleep(delay)
        continue
      prompt_tokens += reply.prompt_tokens
      completion_tokens += reply.completion_tokens
      if reply.refusal is None:
        return Result(request.image_id, request.attribute, "ok", reply.text, prompt_tokens,
                      completion_tokens, attempts)
      refusals += 1
      if refusals > self.max_refusal_retries:
        return Result(request.image_id, request.attribute, "refused", None, prompt_tokens,
                      completion_tokens, attempts,
                      error=f"refused {refusals} times: {redact(reply.refusal, self._api_key)}")

  async def _wait_for_rate_limit(self) -> None:
    while (wait := self._resume_at - time.monotonic()) > 0:
      await asyncio.sleep(wait)
