"""training/summaries.py: event files as TensorBoard loads them, a resume's purge, GCS rollover."""

import pathlib
import struct

import google_crc32c
import pytest

from facellm_jax import paths
from facellm_jax.training import summaries


def _masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_scalars(logdir: pathlib.Path, tag: str) -> list[tuple[int, float]]:
  """`tag`'s (step, value) pairs as TensorBoard loads a run: the event files in name order, each
  record's CRCs checked, a torn last record (a kill mid-write) ignored, a `SessionLog.START`
  dropping what was loaded at and past its step."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      if pos + 16 + length > len(data):
        break
      body = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked_crc(header), path
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == _masked_crc(body), path
      pos += 16 + length
      event = event_pb2.Event.FromString(body)
      if event.session_log.status == event_pb2.SessionLog.START:
        out = [(s, v) for s, v in out if s < event.step]
      out += [(event.step, pytest.approx(v.simple_value, rel=1e-6)) for v in event.summary.value
              if v.tag == tag]
  return out


def test_scalars_are_on_disk_as_soon_as_added(tmp_path):
  writer = summaries.Scalars(tmp_path / "tb")
  writer.add({"train/loss": 2.5, "train/lr": 1e-3}, 1)
  writer.add({"train/loss": 1.25}, 2)
  assert read_scalars(tmp_path / "tb", "train/loss") == [(1, 2.5), (2, 1.25)]
  assert read_scalars(tmp_path / "tb", "train/lr") == [(1, 1e-3)]


def test_a_resumed_run_replaces_the_steps_it_logs_again(tmp_path):
  first = summaries.Scalars(tmp_path)
  for step in range(1, 7):
    first.add({"loss": float(step)}, step)
  # Killed after step 6 with step 4 checkpointed: the rerun logs 5 and 6 again, with other values.
  second = summaries.Scalars(tmp_path, purge_step=5)
  for step in range(5, 9):
    second.add({"loss": 10.0 * step}, step)
  assert len(list(tmp_path.iterdir())) == 2
  assert read_scalars(tmp_path, "loss") == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50), (6, 60), (7, 70), (8, 80)]


def test_on_gcs_each_object_is_rewritten_whole_and_a_new_one_begun_past_the_limit(tmp_path, monkeypatch):
  writes = []
  monkeypatch.setattr(paths, "is_remote", lambda p: True)  # the GCS branch, on a local folder
  real_write = type(paths.path(tmp_path)).write_bytes
  monkeypatch.setattr(type(paths.path(tmp_path)), "write_bytes",
                      lambda self, data: writes.append((self.name, len(data))) or real_write(self, data))
  writer = summaries.Scalars(tmp_path, rollover_bytes=300)
  for step in range(1, 21):
    writer.add({"train/loss": 1.0 / step, "train/grad_norm": 2.0}, step)
  files = sorted(tmp_path.iterdir())
  assert len(files) >= 4 and len(writes) == 21 + len(files) - 1  # one write per add, one per new file
  assert all(f.stat().st_size < 300 + 100 for f in files)  # a part stops just past the limit
  for name, size in writes:  # every write is the object so far, whole
    assert size <= (tmp_path / name).stat().st_size
  assert read_scalars(tmp_path, "train/loss") == [(s, 1.0 / s) for s in range(1, 21)]
