"""The contract between the generation driver and its answer backends.

The driver owns the journal and the dataset; a backend only turns `Request`s into `Result`s.
Every request gets exactly one `emit` call (or none if the process dies first); the driver
journals each result as it arrives, so a crash loses at most the in-flight requests.
"""

from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable, Literal, Protocol, Sequence

Status = Literal["ok", "refused", "failed"]


@dataclasses.dataclass(frozen=True)
class Request:
  image_id: str  # FairFace `file` column, e.g. "val/1.jpg"
  attribute: str  # one of prompts.ATTRIBUTES
  image_path: str  # absolute path of the image on disk
  system_prompt: str
  user_prompt: str  # attribute-aware: carries the known labels
  labels: dict[str, str]  # every label column of the CSV row (offline backend grounds on these)

  @property
  def key(self) -> tuple[str, str]:
    return (self.image_id, self.attribute)

  @property
  def custom_id(self) -> str:
    """Stable id for Batch API lines; maps back with `parse_custom_id`."""
    return f"{self.attribute}|{self.image_id}"


def parse_custom_id(custom_id: str) -> tuple[str, str]:
  attribute, image_id = custom_id.split("|", 1)
  return image_id, attribute


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


class Backend(Protocol):
  name: str  # "offline" | "openai" | "openai-batch"; stored as the dataset's `source`

  async def run(self, requests: Sequence[Request], emit: Emit, meta: MetaStore) -> None:
    """Answers every request, calling `emit` once per request as soon as it is final."""
    ...
