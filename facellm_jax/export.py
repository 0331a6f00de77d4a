"""Entry point `python -m facellm_jax.export` (not built yet)."""

import sys

from facellm_jax._unbuilt import not_built


def main(argv: list[str] | None = None) -> int:
  return not_built("facellm_jax.export")


if __name__ == "__main__":
  sys.exit(main())
