"""The no-key backend: answers built only from the image's ground-truth label columns.

Demos and tests need a teacher that costs nothing and tells the truth. Every sentence here is
a label stated in plain, consistent words ("The expression is happy."), in a few phrasings
chosen deterministically per (seed, image_id, attribute); an attribute with no label column is
said to be unknown rather than made up. Columns beyond FairFace's are those of the synthetic
world: expression, head_pose, roll, eyes, eyeglasses, facial_hair, hair_length, hair_color,
lighting, brightness, sharpness, jpeg_quality, background.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
from typing import Callable, Mapping, Sequence

from data_gen import prompts
from data_gen.backends.base import Emit, MetaStore, Request, Result, Retrying

_Labels = Mapping[str, str]
_EMOTION = {"happy": "happiness", "sad": "sadness", "surprised": "surprise", "angry": "anger",
            "neutral": "calm"}
_LIGHT = {"even": "evenly lit", "left": "lit from the left", "right": "lit from the right"}
_LIGHT_FROM = {"even": "evenly", "left": "from the left", "right": "from the right"}
_FOCUS = {"sharp": "The image is sharp and in focus.",
          "blurry": "The image is blurry and out of focus."}
_BRIGHTNESS = {"dim": "dim", "normal": "normally exposed", "bright": "bright"}
_FACIAL_HAIR = {"none": "no facial hair", "beard": "a beard", "moustache": "a moustache"}
_POSE = {"left": "turned to the left", "right": "turned to the right",
         "frontal": "frontal, facing the camera"}

_FORENSIC_LABELS = ("brightness", "lighting", "sharpness", "jpeg_quality", "eyeglasses", "eyes",
                    "head_pose", "expression")


def _get(labels: _Labels, key: str) -> str | None:
  value = labels.get(key, "").strip()
  return value or None


def _roll_degrees(labels: _Labels) -> int | None:
  try:
    return round(float(labels["roll"]))
  except (KeyError, ValueError):
    return None


class _Writer:
  """Picks one phrasing per fact; the choices are the only randomness in an answer."""

  def __init__(self, labels: _Labels, rng: random.Random):
    self.labels = labels
    self.rng = rng
    self.person = prompts.person_noun(labels["gender"], labels["age"])
    self.age = prompts.age_phrase(labels["age"])
    self.ethnicity = prompts.ethnicity_phrase(labels["race"])

  def pick(self, *variants: str) -> str:
    return self.rng.choice(variants).format(
        person=self.person, age=self.age, ethnicity=self.ethnicity)

  def demographics(self) -> str:
    return self.pick(
        "The person appears to be a {person} aged {age}, of {ethnicity} ethnicity.",
        "This is the face of a {person} of {ethnicity} ethnicity, aged {age}.",
        "The image shows a {person} aged {age}; the apparent ethnicity is {ethnicity}.")

  def expression(self) -> list[str]:
    out = []
    value = _get(self.labels, "expression")
    if value:
      emotion = _EMOTION.get(value, value)
      out.append(self.rng.choice([
          f"The expression is {value}.", f"The {self.person} has a {value} expression.",
          f"The expression is {value}, conveying {emotion}."]))
    eyes = _get(self.labels, "eyes")
    if eyes:
      out.append(f"The eyes are {eyes}.")
    return out

  def hair(self) -> list[str]:
    out = []
    length, color = _get(self.labels, "hair_length"), _get(self.labels, "hair_color")
    if length or color:
      out.append(self.rng.choice([
          f"The {self.person} has {' '.join(v for v in (length, color) if v)} hair.",
          f"The hair is {' and '.join(v for v in (length, color) if v)}."]))
    beard = _get(self.labels, "facial_hair")
    if beard:
      out.append(f"The {self.person} has {_FACIAL_HAIR.get(beard, beard)}.")
    glasses = _get(self.labels, "eyeglasses")
    if glasses == "yes":
      out.append(self.rng.choice([f"The {self.person} wears eyeglasses.",
                                  "Eyeglasses are worn."]))
    elif glasses == "no":
      out.append(f"The {self.person} does not wear eyeglasses.")
    return out

  def pose(self) -> list[str]:
    out = []
    value = _get(self.labels, "head_pose")
    if value:
      out.append(self.rng.choice([f"The head is {_POSE.get(value, value)}.",
                                  f"The face is {_POSE.get(value, value)}."]))
    roll = _roll_degrees(self.labels)
    if roll is not None:
      out.append("The head is upright, with no tilt." if roll == 0 else
                 f"The head is tilted by about {abs(roll)} degrees.")
    return out

  def quality(self) -> list[str]:
    out = []
    light, bright = _get(self.labels, "lighting"), _get(self.labels, "brightness")
    if light:
      variants = [f"The face is {_LIGHT.get(light, f'lit {light}')}."]
      if light in _LIGHT_FROM:
        variants.append(f"Light falls on the face {_LIGHT_FROM[light]}.")
      out.append(self.rng.choice(variants))
    if bright:
      out.append(f"The image is {_BRIGHTNESS.get(bright, bright)}.")
    sharpness = _get(self.labels, "sharpness")
    if sharpness:
      plain = f"The image is {sharpness}."
      out.append(self.rng.choice([plain, _FOCUS.get(sharpness, plain)]))
    jpeg = _get(self.labels, "jpeg_quality")
    if jpeg:
      out.append("There are visible JPEG compression artifacts." if jpeg == "low" else
                 "There are no visible compression artifacts.")
    background = _get(self.labels, "background")
    if background:
      out.append(self.rng.choice([f"The background is plain {background}.",
                                  f"The face is shown against a plain {background}"
                                  " background."]))
    return out

  def forensic_issues(self) -> list[str]:
    """What would hamper identification, each as a clause, from the labels that say so."""
    get = {k: _get(self.labels, k) for k in _FORENSIC_LABELS}.get
    issues = []
    if get("brightness") == "dim":
      issues.append("the image is dim")
    if get("lighting") in ("left", "right"):
      issues.append(f"the face is {_LIGHT[get('lighting')]}, which leaves one side in shadow")
    if get("sharpness") == "blurry":
      issues.append("the image is blurry")
    if get("jpeg_quality") == "low":
      issues.append("JPEG compression artifacts are visible")
    if get("eyeglasses") == "yes":
      issues.append("eyeglasses partly occlude the eye region")
    if get("eyes") == "closed":
      issues.append("the eyes are closed")
    if get("head_pose") in ("left", "right"):
      issues.append(f"the head is {_POSE[get('head_pose')]} rather than frontal")
    if get("expression") not in (None, "neutral"):
      issues.append(f"the {get('expression')} expression changes the face's shape")
    return issues


def _unknown(what: str) -> str:
  return f"The {what} cannot be determined from the available labels."


def _demographics(w: _Writer) -> list[str]:
  return [w.demographics()]


def _facial_structure(w: _Writer) -> list[str]:
  return [w.pick("The face is that of a {person} aged {age}.",
                 "This is a {person} of {ethnicity} ethnicity, aged {age}."),
          *w.hair(),
          "Finer structure such as eye shape, nose, lips and jawline is not covered by the"
          " available labels."]


def _skin_texture(w: _Writer) -> list[str]:
  out = [w.pick("The skin is that of a {person} aged {age}, of {ethnicity} ethnicity.",
                "The face belongs to a {person} of {ethnicity} ethnicity, aged {age}."),
         _unknown("skin texture")]
  if _get(w.labels, "sharpness") == "blurry":
    out.append("The image is blurry, which hides fine skin detail.")
  return out


def _expression(w: _Writer) -> list[str]:
  found = w.expression()
  if not _get(w.labels, "expression"):
    found.insert(0, _unknown("expression"))
  return found


def _lighting(w: _Writer) -> list[str]:
  return w.quality() or [_unknown("lighting and image quality")]


def _pose(w: _Writer) -> list[str]:
  out = w.pose() or [_unknown("face pose")]
  glasses = _get(w.labels, "eyeglasses")
  if glasses == "yes":
    out.append("Eyeglasses partly occlude the eyes.")
  elif glasses == "no":
    out.append("No eyeglasses occlude the eyes.")
  return out


def _forensic(w: _Writer) -> list[str]:
  known = any(_get(w.labels, k) for k in _FORENSIC_LABELS)
  if not known:
    return [w.demographics(), "The available labels do not describe image quality, occlusions"
            " or pose, so no further forensic considerations can be stated."]
  issues = w.forensic_issues()
  if not issues:
    return [w.demographics(), w.pick(
        "No labelled factor hampers identification.",
        "None of the labelled conditions hampers identification of the face.")]
  text = issues[0] if len(issues) == 1 else "; ".join(issues[:-1]) + "; and " + issues[-1]
  return [w.demographics(),
          w.pick("For identification, note that ", "Forensically relevant: ") + text + "."]


def _description(w: _Writer) -> list[str]:
  return [w.demographics(), *w.hair(), *w.expression(), *w.pose(), *w.quality()]


_ANSWERS: dict[str, Callable[[_Writer], list[str]]] = {
    "demographics": _demographics, "facial_structure": _facial_structure,
    "skin_texture": _skin_texture, "expression": _expression, "lighting": _lighting,
    "pose": _pose, "forensic": _forensic, "description": _description,
}
assert set(_ANSWERS) == set(prompts.ATTRIBUTES)


class OfflineBackend:
  """Label-grounded answers, deterministic per (seed, image_id, attribute)."""

  name = "offline"

  def __init__(self, seed: int = 0, delay: float = 0.0):
    self.seed = seed
    self.delay = delay  # seconds per answer: lets demos and crash tests see a run in flight

  def answer_inputs(self, request: Request) -> dict[str, object]:
    """Only the labels and the seed make an offline answer (not the prompt, not the image)."""
    return {"labels": dict(sorted(request.labels.items())), "offline_seed": self.seed}

  def answer(self, image_id: str, attribute: str, labels: _Labels) -> str:
    digest = hashlib.sha256(f"{self.seed}|{image_id}|{attribute}".encode()).digest()
    writer = _Writer(labels, random.Random(int.from_bytes(digest[:8], "big")))
    return " ".join(_ANSWERS[attribute](writer))

  async def run(self, requests: Sequence[Request], emit: Emit, meta: MetaStore,
                retrying: Retrying | None = None) -> None:
    del meta, retrying  # nothing to resume beyond the journal, nothing ever retried
    for request in requests:
      if self.delay:
        await asyncio.sleep(self.delay)
      result = Result(request.image_id, request.attribute, "ok",
                      answer=self.answer(request.image_id, request.attribute, request.labels))
      pending = emit(result)
      if inspect.isawaitable(pending):
        await pending
