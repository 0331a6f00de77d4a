"""Placeholder for entry points whose issue has not landed: says so and exits non-zero."""

import sys


def not_built(name: str) -> int:
  print(f"{name} is not built yet in this version of facellm-jax.", file=sys.stderr)
  return 2
