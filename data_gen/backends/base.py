"""The contract between the generation driver and its answer backends.

The driver owns the journal and the dataset; a backend only turns `Request`s into `Result`s.
Every request gets exactly one `emit` call (or none if the process dies first); the driver
journals each result as it arrives, so a crash loses at most the in-flight requests.

A journaled answer is only as good as what it was made from: the driver stores with it a
fingerprint of the backend's `answer_inputs` (the prompt text with its labels, the model, the
image bytes, ...), and a rerun whose inputs differ asks again instead of reusing it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Awaitable, Callable, Literal, Mapping, Protocol, Sequence

Status = Literal["ok", "refused", "failed"]


class FatalApiError(RuntimeError):
  """The server refused the whole run (rejected key, no quota, unreachable): no retry can
  succeed, so the backend stops and the driver reports this message."""


@dataclasses.dataclass(frozen=True)
class Request:
  image_id: str  # FairFace `file` column, e.g. "val/1.jpg"
  attribute: str  # one of prompts.ATTRIBUTES
  image_path: str  # absolute path of the image on disk
  system_prompt: str
  user_prompt: str  # attribute-aware: carries the known labels
  labels: dict[str, str]  # every label column of the CSV row (offline backend grounds on these)
  inputs: str = ""  # fingerprint of what the answer is made from (set by the driver)

  @property
  def key(self) -> tuple[str, str]:
    return (self.image_id, self.attribute)

  @property
  def custom_id(self) -> str:
    """Id of the request's Batch API line; with the fingerprint, so a batch journaled before
    the inputs changed cannot answer the changed request."""
    return f"{self.attribute}|{self.image_id}" + (f"|{self.inputs[:16]}" if self.inputs else "")


def request_inputs(request: Request) -> dict[str, object]:
  """Everything a request carries: what a backend that does not say otherwise is made from."""
  return {"system": request.system_prompt, "user": request.user_prompt,
          "labels": dict(sorted(request.labels.items())), "image": file_sha256(request.image_path)}


def fingerprint(inputs: Mapping[str, object]) -> str:
  return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def file_sha256(path: str) -> str:
  """The file's SHA-256 ("" if it cannot be read); cached per (path, size, mtime), since each
  image is asked about once per attribute."""
  try:
    st = os.stat(path)
  except OSError:
    return ""
  return _sha256_of(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # cache key only
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  except OSError:
    return ""
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Result:
  image_id: str
  attribute: str
  status: Status
  answer: str | None = None  # set only when status == "ok"
  prompt_tokens: int = 0
  completion_tokens: int = 0
  attempts: int = 1
  error: str | None = None  # short reason for refused/failed; never contains the API key

  @property
  def key(self) -> tuple[str, str]:
    return (self.image_id, self.attribute)


class MetaStore(Protocol):
  """Small durable key-value store inside the journal (e.g. the Batch API's batch ids)."""

  def get(self, key: str) -> str | None: ...

  def set(self, key: str, value: str) -> None: ...


Emit = Callable[[Result], Awaitable[None] | None]
# Called for each failed attempt that will be retried: (the request, or None for a call that
# serves many, such as a batch upload; the reason). The driver shows it as it happens.
Retrying = Callable[[Request | None, str], None]


def unheard(request: Request | None, reason: str) -> None:
  """The `retrying` callback when nobody listens (a backend used on its own)."""
  del request, reason


class Backend(Protocol):
  name: str  # "offline" | "openai" | "openai-batch"; stored as the dataset's `source`

  def answer_inputs(self, request: Request) -> dict[str, object]:
    """What this backend's answer to `request` is made from (JSON-able); the driver
    fingerprints it. A backend without this method is taken to use `request_inputs`."""
    ...

  async def run(self, requests: Sequence[Request], emit: Emit, meta: MetaStore,
                retrying: Retrying | None = None) -> None:
    """Answers every request, calling `emit` once per request as soon as it is final."""
    ...
