"""TensorBoard scalars, written as they are logged, through `paths` (a local or `gs://` folder).

tensorboardX's own writer hands events to a thread (its `flush` does not wait for them) and on
gs:// uploads the whole event file at every flush and once more at interpreter exit (an atexit hook
and `GCSRecordWriter.__del__`), each upload retrying for minutes if GCS is unreachable by then. An
event file is only TFRecord framing around `Event` protos, so this writes it directly, through a
`paths.AppendFile` (appended and fsynced locally; on GCS, which has no append, the object is
rewritten at each `add`), and on GCS begins a new file once one holds `rollover_bytes`, so one
upload stays small however long the run. TensorBoard reads all of a run's event files, in name order.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from typing import Mapping

from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.record_writer import masked_crc32c

from facellm_jax import paths

_FILES = itertools.count(1)  # numbers this process's files: two writers never share a name


def _record(event: event_pb2.Event) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the serialized event, its masked CRC-32C."""
  data = event.SerializeToString()
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


class Scalars:
  """Event files of scalars under `logdir`, one file per writer (per rollover part on GCS).

  `purge_step`: the first step a resumed run logs again; TensorBoard then drops the events of the
  earlier files at and past it (a `SessionLog.START` event), so each step shows once, as in
  `metrics.jsonl`.
  """

  def __init__(self, logdir: paths.PathLike, *, purge_step: int | None = None,
               rollover_bytes: int = 256 << 10):
    self._dir = paths.makedirs(logdir)
    self._rollover = rollover_bytes if paths.is_remote(self._dir) else None
    self._begin(purge_step)

  def _begin(self, purge_step: int | None = None) -> None:
    # The time first, then the number: later files sort after earlier ones, as the purge needs.
    self._file = paths.AppendFile(self._dir / (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
        f"{next(_FILES):04d}"))
    now = time.time()
    events = [event_pb2.Event(wall_time=now, file_version="brain.Event:2")]
    if purge_step is not None:
      events.append(event_pb2.Event(wall_time=now, step=purge_step, session_log=event_pb2.SessionLog(
          status=event_pb2.SessionLog.START)))
    self._file.add(b"".join(_record(e) for e in events))

  def add(self, values: Mapping[str, float], step: int) -> None:
    """Writes one step's scalars (tag -> value) and makes them durable before returning."""
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                                         for tag, v in values.items()])
    self._file.add(_record(event_pb2.Event(wall_time=time.time(), step=step, summary=summary)))
    if self._rollover is not None and self._file.size >= self._rollover:
      self._begin()
