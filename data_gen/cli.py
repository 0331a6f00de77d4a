"""The data_gen commands' shared conventions: one-line errors, and what an output folder may be.

Every command checks its outputs before it writes anything, with the same rules: a folder may be
new or empty; `generate` may also resume one of its own outputs; a file, someone else's folder
or a folder this user cannot write to is refused in one line. Only the standard library here,
so the lightest command does not pay for TFDS.
"""

from __future__ import annotations

import argparse
import os
from typing import Collection

# The names that mark a folder as a data_gen output that `generate` may resume.
OUTPUT_MARKERS = frozenset({".journal", "dataset_info.json", "report.json"})


class CliError(Exception):
  """Bad input: reported as one line on stderr with a non-zero exit, before OUT is touched."""


class OneLineParser(argparse.ArgumentParser):
  """argparse, but a usage error is a single line (the commands' error convention)."""

  def error(self, message: str):
    raise CliError(f"{message} (see `{self.prog} --help`)")


def check_out_dir(out: str, flag: str = "--out", resumable: Collection[str] = ()) -> None:
  """Refuses an output that is a file, a non-empty folder (unless it holds one of the
  `resumable` names: an output this command continues), or not writable by this user.

  Nothing is created: a command that then finds bad input leaves no trace.
  """
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise CliError(f"{flag} {out} exists and is not a directory")
    entries = set(os.listdir(out))
    if entries and not entries & set(resumable):
      ours = " that is not a data_gen output this command resumes" if resumable else ""
      raise CliError(f"{flag} {out} is a non-empty directory{ours}; choose a new or empty"
                     " directory")
    _check_writable(out, flag, out)
    return
  _check_creatable(out, flag)


def check_out_file(path: str, flag: str) -> None:
  """Refuses an output file that is a folder or that this user could not create or replace."""
  if os.path.isdir(path):
    raise CliError(f"{flag} {path} is a directory; expected a file name")
  if os.path.exists(path):
    if not os.access(path, os.W_OK):
      raise CliError(f"{flag} {path} is not writable by this user: permission denied")
    return
  _check_creatable(path, flag)


def _check_creatable(path: str, flag: str) -> None:
  """The nearest existing folder above `path` must be a folder this user may write in."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise CliError(f"{flag} {path} cannot be created: {parent} is not a directory")
  _check_writable(parent, flag, path)


def _check_writable(directory: str, flag: str, out: str) -> None:
  # os.access asks with the real uid, as the write will; root passes, as its writes do.
  if not os.access(directory, os.W_OK | os.X_OK):
    where = "" if directory == out else f" (cannot create it in {directory})"
    raise CliError(f"{flag} {out} is not writable by this user{where}: permission denied")
