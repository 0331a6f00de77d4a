"""`python -m data_gen <command> ...`: each command lives in its own module with `main(argv)`."""

import importlib
import sys

COMMANDS = {
    "synth": ("data_gen.synth", "render synthetic faces with ground truth (FairFace format)"),
    "generate": ("data_gen.generate", "attribute QA generation -> TFDS ArrayRecord dataset"),
    "import-sharegpt": ("data_gen.sharegpt", "import a ShareGPT file (the published dataset.json)"),
    "import-raw": ("data_gen.raw", "import the reference generator's question_/answer_ files"),
    "mcq": ("data_gen.mcq", "multiple-choice training items about synthetic faces"),
    "cards": ("data_gen.cards", "attribute cards (the demo's pretraining items)"),
    "inspect": ("data_gen.inspect", "print a summary of a generated dataset"),
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in COMMANDS:
    print("usage: python -m data_gen {" + ",".join(COMMANDS) + "} [options]", file=sys.stderr)
    for name, (_, help_text) in COMMANDS.items():
      print(f"  {name:16s} {help_text}", file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  module_name, _ = COMMANDS[argv[0]]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    print(f"`{argv[0]}` is not built yet in this version of facellm-jax.", file=sys.stderr)
    return 2
  return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())
