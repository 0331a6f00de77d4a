"""`python -m facellm_jax.chat` one-shot and interactive, and `inference.answer` prompt building."""

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from facellm_jax import chat
from facellm_jax.inference import answer, load
from facellm_jax.input import face_crop
from facellm_jax.input import image as image_lib
from tiny_runs import face_png

NEW_TOKENS = 8
QUESTION = "How old is this person?"


@pytest.fixture(scope="module")
def workdir(lora_workdir):
  return lora_workdir


@pytest.fixture(scope="module")
def loaded(workdir):
  return load.load_for_inference(workdir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat_images")
  astronaut = root / "astronaut.png"
  Image.fromarray(skimage.data.astronaut()).save(astronaut)
  coffee = root / "coffee.png"
  Image.fromarray(skimage.data.coffee()).save(coffee)
  return {"a": face_png(root / "a.png", 1), "b": face_png(root / "b.png", 2), "astronaut": astronaut,
          "coffee": coffee}


def _chat(workdir, *args):
  return chat.main(["--workdir", str(workdir), "--max_new_tokens", str(NEW_TOKENS), *map(str, args)])


def test_one_shot_question_prints_the_streamed_answer(workdir, loaded, images, capsys):
  assert _chat(workdir, "--image", images["a"], QUESTION) == 0
  expected = answer.answer(*loaded, QUESTION, [images["a"]], max_new_tokens=NEW_TOKENS)
  assert expected and capsys.readouterr().out == expected + "\n"


def test_streamed_pieces_join_to_the_answer(loaded, images):
  pieces = list(answer.stream_answer(*loaded, QUESTION, [images["a"], images["b"]], max_new_tokens=NEW_TOKENS))
  assert len(pieces) > 1
  assert "".join(pieces) == answer.answer(*loaded, QUESTION, [images["a"], images["b"]], max_new_tokens=NEW_TOKENS)


def test_interactive_mode_reads_questions_and_image_commands_from_stdin(workdir, loaded, images, monkeypatch,
                                                                        capsys):
  script = ["What is shown?", "/image missing.png", f"/image {images['b']}", QUESTION, "/nope", "/quit",
            "never asked"]
  monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(script) + "\n"))
  assert _chat(workdir, "--image", images["a"]) == 0
  lines = capsys.readouterr().out.splitlines()
  settings = dict(max_new_tokens=NEW_TOKENS)
  assert lines == [
      chat.HELP,
      answer.answer(*loaded, "What is shown?", [images["a"]], **settings),
      "error: image file not found: missing.png",
      f"[1 image(s): {images['b']}]",
      answer.answer(*loaded, QUESTION, [images["b"]], **settings),
      f"unknown command '/nope'. {chat.HELP}",
  ]


def test_detect_face_asks_about_the_fairface_crop(workdir, loaded, images, capsys):
  assert _chat(workdir, "--detect-face", "--image", images["astronaut"], QUESTION) == 0
  crop = face_crop.crop_largest_face(skimage.data.astronaut())
  assert capsys.readouterr().out == answer.answer(*loaded, QUESTION, [crop], max_new_tokens=NEW_TOKENS) + "\n"


def test_detect_face_without_a_face_is_a_clear_error(workdir, images, capsys):
  assert _chat(workdir, "--detect-face", "--image", images["coffee"], QUESTION) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"error: no face found in {images['coffee']}")


def test_missing_image_fails_before_loading_the_model(tmp_path, capsys):
  assert chat.main(["--workdir", str(tmp_path), "--image", str(tmp_path / "x.jpg"), QUESTION]) == 2
  assert capsys.readouterr().err.strip() == f"error: image file not found: {tmp_path / 'x.jpg'}"


def test_prompt_places_every_image_in_order(loaded, images):
  _, config, tokenizer = loaded
  ids, pixels = answer.prepare(config, tokenizer, "Same person?", [images["a"], images["b"]])
  n = config.image_seq_length
  text = tokenizer.decode(ids)
  assert text.startswith("<|im_start|>user\nImage-1: <img>") and text.endswith("<|im_start|>assistant\n")
  assert text.count("<img>" + "<IMG_CONTEXT>" * n + "</img>") == 2 and "Image-2: <img>" in text
  size = config.vision.image_size
  expected = [image_lib.preprocess(image_lib.load_image(images[k]), size)[0] for k in "ab"]
  np.testing.assert_array_equal(pixels, np.stack(expected))


def test_markers_must_match_the_images(loaded, images):
  _, config, tokenizer = loaded
  ids, _ = answer.prepare(config, tokenizer, "First <image> then <image>?", [images["a"], images["b"]])
  assert tokenizer.decode(ids).startswith("<|im_start|>user\nFirst <img>")
  with pytest.raises(ValueError, match="1 '<image>' marker"):
    answer.prepare(config, tokenizer, "Only <image> here", [images["a"], images["b"]])
