"""evaluate/chat defaults are the reference's (tiling on, 2,048 / 500 new tokens, no system message);
`--fast` is one tile and short answers. Shown on the synthetic benchmark by what reaches the model."""

import json

import numpy as np
import pytest

from data_gen import synth
from facellm_jax import chat
from facellm_jax import evaluate as evaluate_cli
from facellm_jax.inference import answer as answer_lib
from facellm_jax.inference import load

IMAGE_SIZE = 224  # synthetic faces twice the tiny model's 112 px tile: a 2 x 2 grid + thumbnail


@pytest.fixture(scope="module")
def synth_bench(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth_bench")
  synth.write_benchmark(root, num=1, seed=0, size=IMAGE_SIZE)  # one question per task, 7 in all
  return root


class _Spy:
  """A Generator that records what each call receives and returns: image placeholders per prompt,
  tiles, the answer limit, whether a system turn leads, each answer's length in tokens (to its EOS)."""

  def __init__(self, gen, tokenizer, seen):
    self._gen, self._tok, self._seen = gen, tokenizer, seen
    self._eos = list(answer_lib.eos_ids(tokenizer))

  def _record(self, prompts, pixels, lengths):
    self._seen.append({"image_tokens": [p.count(self._tok.image_token_id) for p in prompts],
                       "tiles": 0 if pixels is None else len(pixels),
                       "max_new_tokens": self._gen.decoding.max_new_tokens,
                       "system": [self._tok.decode(p[:16]).startswith("<|im_start|>system") for p in prompts],
                       "lengths": lengths})

  def __call__(self, prompts, pixels, seed=0, batch=None):
    out = self._gen(prompts, pixels, seed=seed, batch=batch)
    ends = [np.isin(row, self._eos) for row in out]
    self._record(prompts, pixels, [int(np.argmax(e)) + 1 if e.any() else len(e) for e in ends])
    return out

  def stream(self, prompt, pixels, seed=0):
    tokens = list(self._gen.stream(prompt, pixels, seed=seed))
    self._record([prompt], pixels, [len(tokens)])
    yield from tokens


@pytest.fixture
def calls(monkeypatch):
  seen = []
  real = answer_lib.generator
  monkeypatch.setattr(answer_lib, "generator", lambda model, tok, settings: _Spy(real(model, tok, settings), tok, seen))
  return seen


def _evaluate(workdir, bench, out, *extra):
  assert evaluate_cli.main(["--workdir", str(workdir), "--facexbench", str(bench), "--out", str(out), *extra]) == 0
  return json.loads(out.read_text())


def test_evaluate_defaults_tile_and_allow_long_answers_and_fast_does_not(lora_workdir, synth_bench, tmp_path, calls):
  _, config, _ = load.load_for_inference(lora_workdir)
  per_tile = config.image_seq_length
  report = _evaluate(lora_workdir, synth_bench, tmp_path / "reference" / "report.json")
  assert (report["max_tiles"], report["max_new_tokens"], report["system_prompt"], report["preset"]) == (
      12, 2048, None, "reference")
  [call] = calls  # 7 questions in one batch of 8 (the Generator adds a dummy row)
  assert call["image_tokens"] == [5 * per_tile] * 7 and call["tiles"] == 5 * 7  # 2 x 2 tiles + thumbnail
  assert call["max_new_tokens"] == 2048 and not any(call["system"])
  assert max(call["lengths"]) > 32  # the tiny model rambles on: the long limit is really used

  calls.clear()
  fast = _evaluate(lora_workdir, synth_bench, tmp_path / "fast" / "report.json", "--fast")
  assert (fast["max_tiles"], fast["max_new_tokens"], fast["preset"]) == (1, 32, "fast")
  [call] = calls
  assert call["image_tokens"] == [per_tile] * 7 and call["tiles"] == 7
  assert call["max_new_tokens"] == 32 and max(call["lengths"]) <= 32


def test_explicit_flags_override_either_preset(lora_workdir, synth_bench, tmp_path, calls):
  report = _evaluate(lora_workdir, synth_bench, tmp_path / "report.json", "--fast", "--max_tiles", "4",
                     "--max_new_tokens", "3", "--system_prompt", "Answer briefly.")
  assert (report["max_tiles"], report["max_new_tokens"], report["system_prompt"]) == (4, 3, "Answer briefly.")
  [call] = calls
  assert call["image_tokens"] == [5 * 16] * 7 and call["max_new_tokens"] == 3 and all(call["system"])


def test_chat_defaults_are_the_reference_inference_script(lora_workdir, synth_bench, calls, capsys):
  image = synth_bench / "images/synthetic_single_mcq_age/question_1.jpg"
  assert chat.main(["--workdir", str(lora_workdir), "--image", str(image), "How old is this person?"]) == 0
  assert chat.main(["--workdir", str(lora_workdir), "--fast", "--image", str(image), "How old?"]) == 0
  capsys.readouterr()
  assert [(c["max_new_tokens"], c["tiles"], c["image_tokens"], c["system"]) for c in calls] == [
      (500, 5, [5 * 16], [False]), (256, 1, [16], [False])]
  assert 32 < calls[0]["lengths"][0] <= 500 and calls[1]["lengths"][0] <= 256
