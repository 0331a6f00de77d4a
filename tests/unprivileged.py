"""Commands run as an unprivileged user, for permission tests: root ignores file modes.

CI and this project's boxes run the suite as root, where `chmod 0o555` stops nothing, so a
read-only folder is only read-only for another user. `run_unprivileged` drops to uid/gid 65534
(nobody) with util-linux's `setpriv` when the suite runs as root, and runs the command as the
current user otherwise (where modes already bind).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

NOBODY = 65534


def open_up(path: pathlib.Path) -> pathlib.Path:
  """Lets every user traverse `path` and its parents (pytest's tmp root is 0o700) and read it."""
  path = pathlib.Path(path).resolve()
  for p in [path, *path.parents]:
    mode = p.stat().st_mode
    extra = stat.S_IXOTH | stat.S_IROTH if p == path or p.is_dir() else stat.S_IROTH
    if mode & extra != extra:
      os.chmod(p, mode | extra)
  return path


def give_away(path: pathlib.Path) -> pathlib.Path:
  """Makes `path` (a file or a whole tree) owned by the unprivileged user, so it may write there."""
  if os.geteuid() == 0:
    for p in [path, *pathlib.Path(path).rglob("*")]:
      os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
  return pathlib.Path(path)


def run_unprivileged(args: list[str], *, home: pathlib.Path, env: dict[str, str] | None = None,
                     **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run(args)` as uid/gid 65534 when root, else as ourselves; `home` (made
  traversable) is its HOME. The session's XLA cache is left out: nobody may not write there."""
  env = dict(os.environ if env is None else env)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  home.mkdir(parents=True, exist_ok=True)
  open_up(home)
  give_away(home)
  env["HOME"] = str(home)
  if os.geteuid() == 0:
    if shutil.which("setpriv") is None:
      pytest.skip("setpriv (util-linux) is needed to run a command as an unprivileged user")
    args = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args]
  kwargs.setdefault("capture_output", True)
  kwargs.setdefault("text", True)
  return subprocess.run(args, env=env, **kwargs)


def python_unprivileged(module_args: list[str], *, home: pathlib.Path, cwd: pathlib.Path,
                        **kwargs) -> subprocess.CompletedProcess:
  """`python -m ...` of this interpreter, unprivileged, from `cwd` (the repository root)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH", "")]))
  return run_unprivileged([sys.executable, "-m", *module_args], home=home, env=env, cwd=cwd, **kwargs)
