"""Entry point: `python -m facellm_jax.chat --workdir W|--hf DIR --image face.jpg [--image b.jpg] "question"`.

Streams the answer to the terminal as it is generated. Without a question it is an interactive
loop: type a question, `/image PATH [PATH ...]` to change the images (no path: none), `/quit`
(or end of input) to leave. Each question is asked afresh about the current images.

`--detect-face` crops each image to its largest face FairFace-style (margin 0.25, see
`input/face_crop.py`), for photos that are not already face crops. Greedy decoding unless
`--temperature` > 0. The defaults are the reference's `inference.py` (idiap/facellm): the HF
processor's dynamic tiling (up to 12 tiles + a thumbnail), up to 500 new tokens, no system
message; `--fast` is one tile and 256 tokens. `--mesh data=D,fsdp=F,tensor=T` places the model on
this machine's devices (default: all, tensor parallel as wide as the heads divide; see
`inference/load.py`), so a model larger than one chip answers too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from facellm_jax import paths
from facellm_jax.inference import answer, load
from facellm_jax.input import face_crop
from facellm_jax.input import image as image_lib

# idiap/facellm inference.py: generate(max_new_tokens=500) on AutoProcessor inputs (tiling on).
REFERENCE = {"max_new_tokens": 500, "max_tiles": 12}
FAST = {"max_new_tokens": 256, "max_tiles": 1}
HELP = "Type a question; /image PATH [PATH ...] changes the images (none: no image); /quit leaves."


def _parser() -> load.ArgumentParser:
  parser = load.ArgumentParser(prog="python -m facellm_jax.chat", description=__doc__.split("\n\n")[1])
  load.add_model_args(parser)
  parser.add_argument("--image", action="append", default=[], help="image file (repeat for several, in order)")
  parser.add_argument("--detect-face", dest="detect_face", action="store_true",
                      help="crop each image to its largest face, FairFace-style (margin 0.25)")
  parser.add_argument("--max_new_tokens", type=int, default=None,
                      help=f"answer length limit in tokens (default {REFERENCE['max_new_tokens']}, "
                           f"{FAST['max_new_tokens']} with --fast)")
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
  parser.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--max_tiles", type=int, default=None,
                      help=f"InternVL dynamic tiling: at most this many tiles + a thumbnail per image, 1 = off "
                           f"(default {REFERENCE['max_tiles']}, {FAST['max_tiles']} with --fast)")
  parser.add_argument("--fast", action="store_true", help="one tile per image and shorter answers")
  parser.add_argument("--system_prompt", default=None, help="system message before the question (default: none)")
  parser.add_argument("question", nargs="*", help="the question (none: interactive mode)")
  return parser


def load_images(paths: Sequence[str], detect_face: bool) -> list[np.ndarray]:
  """uint8 RGB images, each cropped to its largest face when `detect_face`."""
  images = []
  for path in paths:
    image = image_lib.load_image(path)
    images.append(face_crop.crop_largest_face(image, source=path) if detect_face else image)
  return images


def ask(model, config, tokenizer, question: str, images: Sequence[np.ndarray], settings: dict, out=None) -> str:
  """Streams the answer to `out` (default stdout), ending the line; returns it."""
  out = out or sys.stdout
  pieces = []
  for piece in answer.stream_answer(model, config, tokenizer, question, images, **settings):
    out.write(piece)
    out.flush()
    pieces.append(piece)
  out.write("\n")
  out.flush()
  return "".join(pieces)


def interactive(model, config, tokenizer, images: list[np.ndarray], settings: dict, detect_face: bool) -> None:
  """The question loop over stdin; a bad `/image` is reported and the previous images kept."""
  prompt = "> " if sys.stdin.isatty() else ""
  print(HELP)
  while True:
    try:
      line = input(prompt).strip()
    except EOFError:
      return
    if not line:
      continue
    if line == "/quit":
      return
    if line.split()[0] == "/image":
      paths = line.split()[1:]
      try:
        images = load_images(paths, detect_face)
      except (OSError, ValueError) as e:
        print(f"error: {e}")
        continue
      print(f"[{len(images)} image(s): {', '.join(paths) or 'none'}]")
      continue
    if line.startswith("/"):
      print(f"unknown command {line.split()[0]!r}. {HELP}")
      continue
    try:
      ask(model, config, tokenizer, line, images, settings)
    except ValueError as e:  # e.g. more <image> markers than images
      print(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  for key, value in (FAST if args.fast else REFERENCE).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, max_tiles=args.max_tiles, system_prompt=args.system_prompt)
  question = " ".join(args.question).strip()
  try:
    if min(args.max_new_tokens, args.max_tiles) < 1:
      raise ValueError("--max_new_tokens and --max_tiles must be >= 1")
    images = load_images(args.image, args.detect_face)  # before the model: bad files fail fast
    model, config, tokenizer = load.load_from_args(args)
    if question:
      ask(model, config, tokenizer, question, images, settings)
    else:
      interactive(model, config, tokenizer, images, settings, args.detect_face)
  except (OSError, ValueError) as e:
    print(f"error: {paths.one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
