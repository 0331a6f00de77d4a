"""Prompts: eight attributes, labels in the teacher prompt only, overridable from a file."""

import json

import pytest

from data_gen import fairface, prompts

LABELS = {"age": "3-9", "gender": "Female", "race": "Latino_Hispanic", "service_test": "True"}


def test_eight_paper_attributes_with_label_free_questions():
  assert list(prompts.ATTRIBUTES) == ["demographics", "facial_structure", "skin_texture",
                                      "expression", "lighting", "pose", "forensic",
                                      "description"]
  assert prompts.QUESTIONS["skin_texture"] == (
      "Describe the skin texture of the image based on the visual information.")
  assert prompts.QUESTIONS["description"] == "Describe this image."
  label_words = set(fairface.AGE_BINS + fairface.GENDERS + fairface.RACES) | {
      "man", "woman", "boy", "girl", "Latino"}
  for question in prompts.QUESTIONS.values():
    assert not label_words & set(question.replace(".", "").split())


@pytest.mark.parametrize("gender, age, noun", [
    ("Male", "20-29", "man"), ("Female", "more than 70", "woman"), ("Male", "3-9", "boy"),
    ("Female", "3-9", "girl"), ("Female", "0-2", "baby girl"), ("Male", "10-19", "man")])
def test_person_noun(gender, age, noun):
  assert prompts.person_noun(gender, age) == noun


def test_user_prompt_carries_the_labels_and_the_attribute():
  prompt_set = prompts.PromptSet()
  text = prompt_set.user_prompt("expression", LABELS)
  assert "girl" in text and "Latino/Hispanic" in text and "3-9 years" in text
  assert "expression and emotion" in text
  assert "Describe this image" in prompt_set.user_prompt("description", LABELS)
  assert "forensic" in prompt_set.system and "biometric" in prompt_set.system


def test_override_file_replaces_only_what_it_sets(tmp_path):
  path = tmp_path / "p.json"
  path.write_text(json.dumps({
      "user": {"pose": "A {age} {person} ({ethnicity}): describe the {attribute}."},
      "question": {"pose": "How is the head oriented?"},
      "refusal_phrases": ["no can do"]}))
  prompt_set = prompts.load_prompts(str(path))
  assert prompt_set.user_prompt("pose", LABELS) == (
      "A 3-9 years girl (Latino/Hispanic): describe the face pose.")
  assert prompt_set.question["pose"] == "How is the head oriented?"
  assert prompt_set.question["lighting"] == prompts.QUESTIONS["lighting"]
  assert prompt_set.system == prompts.SYSTEM_PROMPT
  assert prompt_set.refusal_phrases == ("no can do",)
  assert prompts.load_prompts(None).refusal_phrases is None


@pytest.mark.parametrize("content, message", [
    ({"user": {"pose": "a {name}"}}, "unknown placeholder"),
    ({"question": {"pose": "Is this {person} happy?"}}, "label-free"),
    ({"user": {"mood": "x"}}, "unknown attribute"),
    ({"sytem": "x"}, "unknown key"),
    ({"refusal_phrases": "sorry"}, "list of non-empty strings"),
    ([1, 2], "JSON object"),
])
def test_bad_override_files_are_rejected(tmp_path, content, message):
  path = tmp_path / "p.json"
  path.write_text(json.dumps(content))
  with pytest.raises(prompts.PromptsError, match=message):
    prompts.load_prompts(str(path))


def test_parse_attributes_keeps_canonical_order_and_rejects_unknown():
  assert prompts.parse_attributes(None) == list(prompts.ATTRIBUTES)
  assert prompts.parse_attributes("pose, demographics") == ["demographics", "pose"]
  with pytest.raises(prompts.PromptsError, match="unknown attribute"):
    prompts.parse_attributes("pose,mood")


def test_questions_map_back_to_their_attribute():
  prompt_set = prompts.PromptSet()
  for key, question in prompts.QUESTIONS.items():
    assert prompt_set.attribute_of_question("  " + question.upper() + " ") == key
  assert prompt_set.attribute_of_question("What is the capital of France?") is None
