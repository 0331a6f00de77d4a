"""Entry point: `python -m facellm_jax.train --config=configs/<name>.py[:variant] --workdir=W`.

Overrides: `--config.train.num_steps=50`, `--config.mesh.shape.fsdp=2`, ... (ml_collections; an
unknown key is a flag error). Rerunning with the same workdir resumes from its latest intact
checkpoint. The workdir may be a `gs://` URL. SIGTERM (a preemption) or Ctrl-C saves a checkpoint
after the current step and exits with 128 + the signal's number (143, 130); bad input of any kind
is one `error:` line and exit code 2.

Compile-only (no TPU needed, libtpu installed: `pip install -e '.[tpu]'`): `--compile_only
--topology=v5p-8 [--find_max_batch]` compiles the real train step for that TPU slice with abstract
parameters and prints XLA's per-chip memory and FLOPs as one JSON line, last; nothing is read or
written (`training/compile_only.py`).

Multi-process (one process per host, or several on one machine for testing): pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or set the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables); on TPU pods and SLURM,
`--distributed` lets `jax.distributed.initialize()` find them itself.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from facellm_jax import host_memory, paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                                      "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                                   "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the train step for --topology, print its memory/FLOPs as JSON; no training.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice for --compile_only: v5p-8, v5litepod-16, v6e-8, v5p:2x2x1, ...")
_FIND_MAX_BATCH = flags.DEFINE_bool(
    "find_max_batch", False, "With --compile_only: search the largest rows per chip that fit.")

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped early, checkpoint saved, rerun resumes.
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT (Ctrl-C)


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  if _COORDINATOR.value and _NUM_PROCESSES.value > 1:
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def _run(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: --config=configs/<name>.py and --workdir=DIR are required", file=sys.stderr)
    return 2
  if _COMPILE_ONLY.value:
    return _compile_only()
  if _TOPOLOGY.value or _FIND_MAX_BATCH.value:
    print("error: --topology and --find_max_batch only go with --compile_only", file=sys.stderr)
    return 2
  _initialize_distributed()
  from facellm_jax.training import loop  # pylint: disable=g-import-not-at-top  (after jax setup)

  try:
    loop.train(_CONFIG.value, _WORKDIR.value, show_progress=_PROGRESS.value)
  except loop.Preempted as e:
    print(str(e), file=sys.stderr)
    return 128 + e.signum
  except KeyboardInterrupt:
    print("interrupted: nothing new was saved; rerun the same command to resume from the latest checkpoint",
          file=sys.stderr)
    return INTERRUPTED_EXIT_CODE
  except (ValueError, OSError) as e:  # config, checkpoint, dataset, mesh and path errors: all one line
    logging.debug("training failed", exc_info=True)
    print(f"error: {paths.one_line(e)}", file=sys.stderr)
    return 2
  return 0


def _compile_only() -> int:
  if not _TOPOLOGY.value:
    print("error: --compile_only needs --topology (e.g. v5p-8, v5litepod-16, v6e-8, v5p:2x2x1)", file=sys.stderr)
    return 2
  # Abstract TPU devices come from libtpu alone: jax must neither look for a local TPU nor ask a
  # GCE metadata server, so its backends are the CPU only (before anything initializes them).
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  from facellm_jax.training import compile_only  # pylint: disable=g-import-not-at-top
  from facellm_jax.training import loop  # pylint: disable=g-import-not-at-top

  try:
    report = compile_only.run(_CONFIG.value, _TOPOLOGY.value, search=_FIND_MAX_BATCH.value)
  except (compile_only.TopologyError, loop.ConfigError, ValueError) as e:
    logging.debug("compile-only failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report), flush=True)
  return 0


def _config_file(argv: list[str]) -> str | None:
  """The file part of `--config=FILE[:ARG]` (or `--config FILE`), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, plus one-line errors where ml_collections raises or defers a traceback: a
  config file that does not exist, a `get_config` that refuses its argument, a `--config.KEY`
  that the config does not have."""
  config_file = _config_file(argv)
  if config_file and not os.path.isfile(config_file):
    print(f"error: --config file {config_file} does not exist; expected e.g. configs/tiny.py[:lora]",
          file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # config_flags wraps get_config's error in the traceback text; its last line is the message.
    print(f"error: {lines[-1].strip() if 'Error whilst parsing config file' in str(e) else paths.one_line(e)}",
          file=sys.stderr)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    print(f"error: a config override names a key the config does not have ({e}); overrides given: "
          f"{', '.join(overrides)}", file=sys.stderr)
  except OSError as e:
    print(f"error: --config {config_file}: {paths.one_line(e)}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str] | None = None) -> int:
  host_memory.keep_freed_pages()  # before JAX starts
  argv = list(sys.argv if argv is None else argv)
  saved, sys.argv = sys.argv, argv  # config_flags reads the `--config.*` overrides from sys.argv.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # override flags of an earlier in-process call (the demo, tests).
  for name in ("compile_only", "topology", "find_max_batch"):
    flags.FLAGS[name].unparse()  # and its values of the flags a call may leave out
  try:
    app.run(lambda a: sys.exit(_run(a)), argv=argv, flags_parser=_parse_flags)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 1
  finally:
    sys.argv = saved
  return 0


if __name__ == "__main__":
  sys.exit(main())
