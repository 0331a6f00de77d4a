"""One path layer for every file the CLIs read or write: a local path or a `gs://` URL alike.

Paths are `etils.epath` paths, what Orbax, Grain and TFDS take: local ones go to the OS, `gs://`
ones to gcsfs (fsspec) for files and to tensorstore for Orbax's arrays. Object storage has no
append and no atomic rename of a folder, so:
- a small file (config.json, a report) is written whole by `write_text`: a temporary file renamed
  into place locally; on GCS one object upload is already all-or-nothing;
- a growing record (metrics.jsonl, predictions.jsonl) is a `RecordFile`: appended and fsynced
  locally, rewritten whole on GCS;
- a folder that must appear complete (a tokenizer, an HF export) is copied with its marker file
  last (`copy_dir`).
What stays local: datasets (ArrayRecord's reader opens local files only; a gcsfuse mount is a
local path), data_gen's SQLite journal, and the HF checkpoints `hf.load_pretrained` reads.

Every check raises a one-line `OSError` subclass naming the flag and the path, so the CLIs can
print it as it is (`one_line` flattens the multi-line messages of the storage clients).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import fsspec.config
from etils import epath

Path = epath.Path
PathLike = str | os.PathLike
_LOCAL_COPIES: list[str] = []  # temporary folders of `local_copy`, removed at exit

# gcsfs caches folder listings forever by default, but a run lives for days while other processes
# (the other hosts, an evaluation, the rerun after a preemption) change the bucket: no listing cache.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_remote(p: PathLike) -> bool:
  """True for URLs (`gs://...`), False for local paths (a gcsfuse mount is local)."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath path: a URL as it is, a local path made absolute (not following symlinks)."""
  text = os.fspath(p)
  return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def one_line(error: BaseException | str, limit: int = 400) -> str:
  """An error's message on one line (storage clients put the server's message on a second one)."""
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _bucket(p: epath.Path) -> str:
  return p.parts[2] if len(p.parts) > 2 else ""


def _describe(e: OSError) -> str:
  """gcsfs's 'Forbidden: b/x/o\\n<server message>' -> 'permission denied (<server message>)'."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if lines and lines[0].startswith("Forbidden"):
    return "permission denied" + (f" ({one_line(' '.join(lines[1:]), 200)})" if len(lines) > 1 else "")
  return one_line(e, 200)


def _is_forbidden(e: OSError) -> bool:
  return isinstance(e, PermissionError) or str(e).startswith(("Forbidden", "Unauthorized"))


def _gcs(p: epath.Path):
  """The gcsfs file system that epath itself uses for `p` (one instance for all our calls)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top

  return backend.fsspec_backend.fs(os.fspath(p))


def _check_bucket(p: epath.Path, flag: str) -> None:
  bucket = _bucket(p)
  if not bucket:
    raise FileNotFoundError(f"{flag} {p} names no bucket; expected gs://BUCKET/PATH")
  try:
    found = _gcs(p).exists(bucket)
  except OSError as e:
    if _is_forbidden(e):
      raise PermissionError(f"{flag} {p}: {_describe(e)}") from None
    raise OSError(f"{flag} {p}: cannot reach bucket gs://{bucket} ({_describe(e)})") from None
  if not found:
    raise FileNotFoundError(f"{flag} {p}: bucket gs://{bucket} does not exist (create it with "
                            f"`gcloud storage buckets create gs://{bucket}`, or fix the name)")


def _checked(flag: str, p: epath.Path, call: Callable[[], Any]) -> Any:
  """`call()`, with the storage client's errors turned into one line naming `flag` and `p`."""
  try:
    return call()
  except FileNotFoundError:
    raise
  except OSError as e:
    cls = PermissionError if _is_forbidden(e) else OSError
    raise cls(f"{flag} {p}: {_describe(e)}") from None


def check_input_dir(p: PathLike, flag: str) -> epath.Path:
  """`p` is an existing folder (a bucket prefix with objects under it, on GCS)."""
  p = path(p)
  if is_remote(p):
    _check_bucket(p, flag)
  if not _checked(flag, p, p.is_dir):
    if _checked(flag, p, p.exists):
      raise NotADirectoryError(f"{flag} {p} is a file, not a folder")
    raise FileNotFoundError(f"{flag} {p} does not exist")
  return p


def check_output_dir(p: PathLike, flag: str, *, empty: bool = False) -> epath.Path:
  """`p` is a folder this process may create and write into (and, with `empty`, holds nothing).

  Checked before any output is written, so a bad flag costs nothing. Locally: every existing
  part of the path is a folder and the nearest existing one is writable. On GCS: the bucket
  exists and a probe object can be written and deleted there.
  """
  p = path(p)
  if is_remote(p):
    _check_bucket(p, flag)
    if _checked(flag, p, p.exists) and not _checked(flag, p, p.is_dir):
      raise NotADirectoryError(f"{flag} {p} is a file, not a folder")
    if empty and _checked(flag, p, p.is_dir) and _checked(flag, p, lambda: any(p.iterdir())):
      raise FileExistsError(f"{flag} {p} is not an empty folder; choose a new one (nothing is overwritten)")
    probe = p / f".write-check-{uuid.uuid4().hex}"
    _checked(flag, p, lambda: probe.write_text(""))
    _checked(flag, p, probe.unlink)
    return p
  existing = pathlib.Path(os.fspath(p))
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    where = "" if existing == pathlib.Path(os.fspath(p)) else f" ({existing} is a file)"
    raise NotADirectoryError(f"{flag} {p} is not a folder{where}")
  if empty and existing == pathlib.Path(os.fspath(p)) and any(existing.iterdir()):
    raise FileExistsError(f"{flag} {p} is not an empty folder; choose a new one (nothing is overwritten)")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{flag} {p} is not writable (permission denied on {existing})")
  return p


def makedirs(p: PathLike) -> epath.Path:
  """Creates a local folder with its parents; nothing on GCS, which has no folders (and where
  gcsfs's makedirs would create a missing bucket)."""
  p = path(p)
  if not is_remote(p):
    p.mkdir(parents=True, exist_ok=True)
  return p


def write_text(p: PathLike, text: str) -> None:
  """Replaces `p` whole: readers see the old content or the new, never a part."""
  p = path(p)
  if is_remote(p):
    p.write_text(text)
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(p.parent), prefix=f".{p.name}.")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.fspath(p))
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json(p: PathLike, data: Any) -> None:
  write_text(p, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class AppendFile:
  """Bytes added at the end of one file, each `add` durable when it returns.

  Locally they are appended and fsynced. GCS has no append, so there the object is rewritten whole
  with everything this writer has held (`content`, then each `add`); `size` lets a caller start a
  new object before the rewrites grow large.
  """

  def __init__(self, p: PathLike, content: bytes = b""):
    self.path = path(p)
    self._data = content if is_remote(self.path) else b""
    self.size = len(content)

  def add(self, data: bytes) -> None:
    self.size += len(data)
    if is_remote(self.path):
      self._data += data
      self.path.write_bytes(self._data)
      return
    with open(os.fspath(self.path), "ab") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


class RecordFile:
  """A JSON-lines file that grows one record at a time and survives a kill at any moment.

  Records are added through an `AppendFile`; a torn last line (a kill mid-write) is cut off when
  the file is opened again. `keep` drops stored records on opening (the steps past a restored
  checkpoint, which the resumed run logs again), so every record is there once.
  """

  def __init__(self, p: PathLike, keep: Callable[[dict], bool] | None = None):
    self.path = path(p)
    self.records, torn = _read_records(self.path)
    kept = [r for r in self.records if keep is None or keep(r)]
    if torn or len(kept) != len(self.records):
      self.records = kept
      write_text(self.path, _lines(kept))
    self._file = AppendFile(self.path, _lines(self.records).encode("utf-8"))

  def append(self, records: Iterable[Mapping[str, Any]]) -> None:
    records = [dict(r) for r in records]
    self.records.extend(records)
    self._file.add(_lines(records).encode("utf-8"))


def _lines(records: Iterable[Mapping[str, Any]]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _read_records(p: epath.Path) -> tuple[list[dict], bool]:
  """The complete lines' records, and whether a torn last line was left out."""
  if not p.exists():
    return [], False
  data = p.read_bytes()
  complete = data.rfind(b"\n") + 1
  records = []
  for number, line in enumerate(data[:complete].decode("utf-8", errors="replace").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}:{number}: not a JSON line ({e.msg}); move the file away to start it over") from None
    if not isinstance(record, dict):
      raise ValueError(f"{p}:{number}: expected a JSON object per line; move the file away to start it over")
    records.append(record)
  return records, complete < len(data)


def copy_dir(src: PathLike, dst: PathLike, *, last: str | None = None) -> None:
  """Copies the files of local folder `src` into `dst` (local or GCS), the file named `last` at
  the end: its presence then says the copy is complete."""
  src = pathlib.Path(src)
  dst = makedirs(dst)
  files = sorted((f for f in src.rglob("*") if f.is_file()), key=lambda f: (f.name == last, str(f)))
  for f in files:
    target = dst / f.relative_to(src).as_posix()
    makedirs(target.parent)
    target.write_bytes(f.read_bytes())


@contextlib.contextmanager
def staged_dir(dst: PathLike, *, last: str | None = None) -> Iterator[pathlib.Path]:
  """A local folder to write `dst`'s content into; it becomes `dst` only when the block succeeds.

  Locally the stage is a hidden sibling of `dst`, renamed onto it (an empty `dst` is replaced);
  on GCS it is a temporary folder uploaded with `last` at the end, and a failed upload removes
  the part already copied. Either way a failure leaves `dst` as it was: absent or empty (the
  caller checks that first, with `check_output_dir(..., empty=True)`).
  """
  dst = path(dst)
  remote = is_remote(dst)
  if not remote:
    makedirs(dst.parent)
  stage = tempfile.mkdtemp(prefix="facellm-stage-") if remote else \
      tempfile.mkdtemp(dir=os.fspath(dst.parent), prefix=f".{dst.name}.tmp-")
  try:
    yield pathlib.Path(stage)
    if not remote:
      os.replace(stage, os.fspath(dst))
      return
    try:
      copy_dir(stage, dst, last=last)
    except BaseException:
      for f in files_under(dst) if dst.is_dir() else []:
        f.unlink(missing_ok=True)
      raise
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def local_copy(p: PathLike, only: Iterable[str] | None = None) -> pathlib.Path:
  """A local folder with the content of `p` (with `only`: just those of its files that exist):
  `p` itself when local, else a download into a temporary folder removed when the process exits."""
  if not is_remote(p):
    return pathlib.Path(p)
  src = path(p)
  tmp = tempfile.mkdtemp(prefix="facellm-download-")
  if not _LOCAL_COPIES:
    atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _LOCAL_COPIES])
  _LOCAL_COPIES.append(tmp)
  if only is None:
    _download(src, pathlib.Path(tmp))
  for name in only or ():
    if (src / name).exists():
      (pathlib.Path(tmp) / name).write_bytes((src / name).read_bytes())
  return pathlib.Path(tmp)


def _download(src: epath.Path, dst: pathlib.Path) -> None:
  for child in src.iterdir():
    if child.is_dir():
      (dst / child.name).mkdir()
      _download(child, dst / child.name)
    else:
      (dst / child.name).write_bytes(child.read_bytes())


def files_under(p: PathLike) -> list[epath.Path]:
  """Every file below folder `p` (epath's `rglob` refuses `**` on GCS)."""
  out = []
  for child in path(p).iterdir():
    out += files_under(child) if child.is_dir() else [child]
  return out


def set_aside(p: PathLike, reason: str) -> epath.Path:
  """Renames folder `p` to `p.<reason>-<time>` and returns the new path. On GCS, which cannot
  rename, every object is copied (server-side) and the originals are deleted only once all the
  copies are there."""
  p = path(p)
  target = p.parent / f"{p.name}.{reason}-{time.strftime('%Y%m%d-%H%M%S')}"
  if not is_remote(p):
    os.rename(os.fspath(p), os.fspath(target))
    return target
  fs = _gcs(p)
  files = files_under(p)
  prefix = os.fspath(p).rstrip("/") + "/"
  for f in files:
    fs.copy(os.fspath(f), os.fspath(target / os.fspath(f)[len(prefix):]))
  if len(files_under(target)) != len(files):
    raise OSError(f"setting {p} aside: only part of it could be copied to {target}; nothing was deleted")
  fs.rm(os.fspath(p), recursive=True)
  return target
