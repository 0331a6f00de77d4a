"""Crash-safe record of finished (image_id, attribute) work: SQLite in WAL mode.

Every result is its own committed transaction (synchronous=FULL), written before the driver
counts it, so `kill -9` at any moment loses at most the requests still in flight. The primary
key makes a duplicate impossible; 'ok' and 'refused' rows are final, while a 'failed' row is
retried by the next run. Each row keeps the fingerprint of what its answer was made from
(`inputs`, see backends.base): a final row is replaced only by a result made from other inputs
(the driver re-asked because a label, the prompt, the model or the image changed). Rows of
journals older than the fingerprint have none and count as made from other inputs. Token usage
accumulates over retries and re-asks so the report shows what was actually paid for. The API
key never reaches this file: results carry only answers, counts and short (already redacted)
error strings.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Iterable

from data_gen.backends.base import Result

FINAL_STATUSES = ("ok", "refused")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
  image_id TEXT NOT NULL,
  attribute TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('ok', 'refused', 'failed')),
  answer TEXT,
  source TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  attempts INTEGER NOT NULL,
  error TEXT,
  updated REAL NOT NULL,
  inputs TEXT,
  PRIMARY KEY (image_id, attribute)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# A failed row, or a final one made from other inputs, takes the new outcome and keeps its
# token bill; a final row is never replaced by a result made from the same (or unknown) inputs.
_UPSERT = """
INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (image_id, attribute) DO UPDATE SET
  status = excluded.status, answer = excluded.answer, source = excluded.source,
  prompt_tokens = results.prompt_tokens + excluded.prompt_tokens,
  completion_tokens = results.completion_tokens + excluded.completion_tokens,
  attempts = results.attempts + excluded.attempts, error = excluded.error,
  updated = excluded.updated, inputs = excluded.inputs
WHERE results.status = 'failed'
   OR (excluded.inputs IS NOT NULL AND results.inputs IS NOT excluded.inputs)
"""


class Journal:
  """The journal of one output directory; also the backends' `MetaStore`."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    # Backends may emit from worker threads; one connection guarded by a lock serves them all.
    self._lock = threading.Lock()
    self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("PRAGMA synchronous=FULL")
    self._db.executescript(_SCHEMA)
    columns = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
    if "inputs" not in columns:  # a journal from before the fingerprint
      self._db.execute("ALTER TABLE results ADD COLUMN inputs TEXT")

  def close(self) -> None:
    with self._lock:
      self._db.close()

  def __enter__(self) -> Journal:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def record(self, result: Result, source: str, inputs: str | None = None) -> bool:
    """Durably stores `result`, made from `inputs` (a fingerprint); False if its key was already
    final from the same inputs (the result is dropped)."""
    if result.status not in ("ok", "refused", "failed"):
      raise ValueError(f"unknown result status {result.status!r} for {result.key}")
    if result.status == "ok" and not result.answer:
      raise ValueError(f"result {result.key} is 'ok' but has no answer")
    answer = result.answer if result.status == "ok" else None
    row = (result.image_id, result.attribute, result.status, answer, source,
           int(result.prompt_tokens), int(result.completion_tokens), int(result.attempts),
           result.error, time.time(), inputs)
    with self._lock:
      changes = self._db.total_changes
      self._db.execute(_UPSERT, row)
      return self._db.total_changes > changes

  def final_inputs(self) -> dict[tuple[str, str], str | None]:
    """The final keys and what each was made from: not requested again while that matches."""
    with self._lock:
      rows = self._db.execute(
          "SELECT image_id, attribute, inputs FROM results WHERE status IN ('ok', 'refused')")
      return {(image_id, attribute): inputs for image_id, attribute, inputs in rows}

  def rows(self, status: str | None = None) -> list[dict[str, object]]:
    """Journal rows (optionally of one status), ordered by key."""
    query = "SELECT * FROM results" + (" WHERE status = ?" if status else "")
    with self._lock:
      cursor = self._db.execute(query + " ORDER BY image_id, attribute",
                                (status,) if status else ())
      names = [d[0] for d in cursor.description]
      return [dict(zip(names, r)) for r in cursor]

  def summary(self, keys: Iterable[tuple[str, str]] | None = None) -> dict[str, int]:
    """Status counts and token totals, over `keys` only when given."""
    wanted = set(keys) if keys is not None else None
    out = {"ok": 0, "refused": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
    with self._lock:
      rows = self._db.execute(
          "SELECT image_id, attribute, status, prompt_tokens, completion_tokens FROM results")
      for image_id, attribute, status, prompt, completion in rows:
        if wanted is None or (image_id, attribute) in wanted:
          out[status] += 1
          out["prompt_tokens"] += prompt
          out["completion_tokens"] += completion
    return out

  # MetaStore: small durable values such as the Batch API's batch ids.
  def get(self, key: str) -> str | None:
    with self._lock:
      row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None

  def set(self, key: str, value: str) -> None:
    with self._lock:
      self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
                       " value = excluded.value", (key, value))
