"""The prompts of a FairFaceGPT run: what the teacher model is told, and what the dataset keeps.

The teacher sees the image's known labels (gender, age, ethnicity) so its description is
anchored to the ground truth; the stored question is label-free, so the student must read the
face itself. Prompts are data: `load_prompts(path)` overrides any part from a JSON file
`{"system": str, "user": {attr: template}, "question": {attr: str}, "refusal_phrases": [str]}`.
User templates may use {person}, {age}, {ethnicity} and {attribute}.
"""

from __future__ import annotations

import dataclasses
import json
import string
from typing import Mapping

# key -> the paper's name for it; the order is the order of requests and of the dataset.
ATTRIBUTES = {
    "demographics": "demographic attributes",
    "facial_structure": "facial structure",
    "skin_texture": "skin texture",
    "expression": "expression and emotion",
    "lighting": "lighting and image quality",
    "pose": "face pose",
    "forensic": "forensic considerations",
    "description": "detailed description",
}

SYSTEM_PROMPT = (
    "You are an assistant that specialises in the analysis of face images for forensic and"
    " biometric work. Describe faces objectively, accurately and in detail, using only what is"
    " visible in the image; do not speculate beyond visible traits, and always give an analysis"
    " of the image you are given. Aspects you may be asked about: demographics (apparent age"
    " range, gender, ethnicity); facial structure and features (eye shape and colour, nose,"
    " lips, jawline, cheekbones and other defining traits); skin texture and condition"
    " (smoothness, wrinkles, scars, freckles, moles, marks); expression and emotion (neutral,"
    " smiling, frowning, surprised, ...); lighting and image quality (brightness, sharpness,"
    " blur, distortions); face pose (frontal, profile, tilt) and occlusions (hair, glasses, mask,"
    " ...); and forensic considerations (low light, partial occlusion, make-up, ageing). You may"
    " be told the person's gender, age and ethnicity, one of seven groups: White, Black, Indian,"
    " East Asian, Southeast Asian, Middle Eastern and Latino. When asked about one aspect,"
    " describe only that aspect. Never reply that you cannot analyse the image. Answer in plain"
    " prose, one or more paragraphs, without lists or headings."
)

_KNOWN = "We know that this is a face image of a {person} of {ethnicity} ethnicity, aged {age}."
_ONE_ASPECT = (
    _KNOWN + " Describe only the {attribute} of the image, and explain your description of the"
    " {attribute} from the visual information (do not say that it is based on a description).")
USER_PROMPTS = {key: _ONE_ASPECT for key in ATTRIBUTES}
USER_PROMPTS["description"] = _KNOWN + " Describe this image in detail."

QUESTIONS = {key: f"Describe the {name} of the image based on the visual information."
             for key, name in ATTRIBUTES.items()}
QUESTIONS["description"] = "Describe this image."  # as in the published FairFaceGPT

_PLACEHOLDERS = frozenset({"person", "age", "ethnicity", "attribute"})


class PromptsError(ValueError):
  """A prompts override file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class PromptSet:
  system: str = SYSTEM_PROMPT
  user: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(USER_PROMPTS))
  question: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(QUESTIONS))
  refusal_phrases: tuple[str, ...] | None = None  # None: the backend's defaults

  def user_prompt(self, attribute: str, labels: Mapping[str, str]) -> str:
    return self.user[attribute].format(
        person=person_noun(labels["gender"], labels["age"]), age=age_phrase(labels["age"]),
        ethnicity=ethnicity_phrase(labels["race"]), attribute=ATTRIBUTES[attribute])

  def attribute_of_question(self, question: str) -> str | None:
    """Maps a stored question back to its attribute (used to import published datasets)."""
    wanted = " ".join(question.lower().split())
    for key, text in self.question.items():
      if " ".join(text.lower().split()) == wanted:
        return key
    return None


def person_noun(gender: str, age: str) -> str:
  """FairFace gender + age bin -> the word the prompts and answers use for the person."""
  male = gender == "Male"
  if age == "0-2":
    return "baby boy" if male else "baby girl"
  if age == "3-9":
    return "boy" if male else "girl"
  return "man" if male else "woman"


def age_phrase(age: str) -> str:
  return age if age == "more than 70" else f"{age} years"


def ethnicity_phrase(race: str) -> str:
  return "Latino/Hispanic" if race == "Latino_Hispanic" else race


def parse_attributes(text: str | None) -> list[str]:
  """`--attributes a,b` -> keys in canonical order; all eight when empty."""
  if not text:
    return list(ATTRIBUTES)
  wanted = [a.strip() for a in text.split(",") if a.strip()]
  unknown = [a for a in wanted if a not in ATTRIBUTES]
  if unknown or not wanted:
    raise PromptsError(f"unknown attribute(s) {','.join(unknown) or repr(text)};"
                       f" expected a comma list of {','.join(ATTRIBUTES)}")
  return [a for a in ATTRIBUTES if a in wanted]


def load_prompts(path: str | None) -> PromptSet:
  """Defaults, overridden by whatever the JSON file at `path` sets."""
  if path is None:
    return PromptSet()
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise PromptsError(f"cannot read prompts file {path}: {e}") from e
  if not isinstance(data, dict):
    raise PromptsError(f"{path}: expected a JSON object, found {type(data).__name__}")
  extra = set(data) - {"system", "user", "question", "refusal_phrases"}
  if extra:
    raise PromptsError(f"{path}: unknown key(s) {', '.join(sorted(extra))}; expected system,"
                       " user, question, refusal_phrases")
  system = data.get("system", SYSTEM_PROMPT)
  if not isinstance(system, str) or not system.strip():
    raise PromptsError(f"{path}: `system` must be a non-empty string")
  user = {**USER_PROMPTS, **_attribute_map(data.get("user", {}), "user", path)}
  question = {**QUESTIONS, **_attribute_map(data.get("question", {}), "question", path)}
  for key, template in user.items():
    _check_template(template, _PLACEHOLDERS, f"{path}: user[{key!r}]")
  for key, text in question.items():
    _check_template(text, frozenset(), f"{path}: question[{key!r}] (questions are label-free)")
  phrases = data.get("refusal_phrases")
  if phrases is not None and (not isinstance(phrases, list) or
                              not all(isinstance(p, str) and p for p in phrases)):
    raise PromptsError(f"{path}: `refusal_phrases` must be a list of non-empty strings")
  return PromptSet(system, user, question, tuple(phrases) if phrases is not None else None)


def _attribute_map(value: object, name: str, path: str) -> dict[str, str]:
  if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
    raise PromptsError(f"{path}: `{name}` must map attribute keys to strings")
  unknown = set(value) - set(ATTRIBUTES)
  if unknown:
    raise PromptsError(f"{path}: `{name}` has unknown attribute(s) {', '.join(sorted(unknown))};"
                       f" expected some of {', '.join(ATTRIBUTES)}")
  return value


def _check_template(template: str, allowed: frozenset[str], where: str) -> None:
  try:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
  except ValueError as e:
    raise PromptsError(f"{where}: bad template ({e})") from e
  unknown = fields - allowed
  if unknown:
    allowed_text = ", ".join("{" + a + "}" for a in sorted(allowed)) or "none"
    raise PromptsError(f"{where}: unknown placeholder(s) {', '.join(sorted(unknown))};"
                       f" allowed: {allowed_text}")
