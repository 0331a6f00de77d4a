"""KV-cache generation: greedy equals transformers' generate token for token; EOS, sampling, compiles."""

import jax
import numpy as np
import pytest
import torch

from facellm_jax import hf
from facellm_jax.inference.generate import TRACES, Generator, generate, stream
from facellm_jax.inference.sampling import Sampling, sample
from hf_tiny import IMAGE_TOKEN_ID as IMG, make_hf_model, save_hf_model

EOS = (126, 127)  # never produced by the fixture's greedy runs (the parity test checks all 16 come out)
PAD = 0
NEW = 16


@pytest.fixture(scope="module")
def hf_model():
  return make_hf_model(scale=0.3)  # large enough weights for varied (non-repeating) greedy tokens


@pytest.fixture(scope="module")
def model(hf_model, tmp_path_factory):
  return hf.load_pretrained(save_hf_model(hf_model, tmp_path_factory.mktemp("tiny_internvl")))[0]


@pytest.fixture(scope="module")
def greedy(model):
  return Generator(model, max_new_tokens=NEW, eos_ids=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def sampler(model):
  return Generator(model, max_new_tokens=NEW, eos_ids=EOS, pad_id=PAD, temperature=1.0)


def _prompts():
  """Two prompts with images (one and two) at different offsets, their pixels, two text-only prompts."""
  rng = np.random.default_rng(1)
  text = lambda n: rng.integers(1, 110, n).tolist()
  with_images = [text(3) + [IMG] * 4 + text(5), text(9) + [IMG] * 4 + text(2) + [IMG] * 4 + text(4)]
  pixels = rng.standard_normal((3, 56, 56, 3)).astype(np.float32)
  return with_images, pixels, [text(7), text(15)]


def _hf_generate(hf_model, prompts, pixels):
  """transformers' greedy generate on the same prompts, left-padded with an attention mask."""
  width = max(map(len, prompts))
  ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  kw = {} if pixels is None else dict(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                          eos_token_id=list(EOS), pad_token_id=PAD, **kw)
  return out[:, width:].tolist()


@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text_only"])
def test_greedy_equals_transformers_generate(hf_model, greedy, with_images):
  image_prompts, pixels, text_prompts = _prompts()
  prompts, pixels = (image_prompts, pixels) if with_images else (text_prompts, None)
  expected = _hf_generate(hf_model, prompts, pixels)
  assert [len(r) for r in expected] == [NEW, NEW] and not set(EOS) & set(sum(expected, []))
  assert all(len(set(r)) >= 5 for r in expected), f"degenerate reference sequences {expected}"
  assert greedy(prompts, pixels) == expected


def test_prompt_decodes_the_same_alone_and_left_padded_in_a_batch(greedy):
  _, _, (short, long) = _prompts()
  assert greedy([short, long]) == [greedy([short])[0], greedy([long])[0]]


def test_eos_stops_its_row_and_the_others_continue(model, greedy):
  prompts, pixels, _ = _prompts()
  full = greedy(prompts, pixels)
  stop = next(t for t in full[0][3:] if t not in full[1])  # ends row 0 early, never row 1
  cut = generate(model, prompts, pixels, max_new_tokens=NEW, eos_ids=(stop,), pad_id=PAD)
  assert cut[0] == full[0][:full[0].index(stop)]
  assert cut[1] == full[1] and len(cut[1]) == NEW


def test_stream_yields_the_batch_tokens_one_by_one(greedy, sampler):
  _, _, prompts = _prompts()
  assert list(greedy.stream(prompts[0])) == greedy([prompts[0]])[0]
  # Row 0 of a batch draws the same randomness as a lone prompt, and padding changes nothing.
  assert list(sampler.stream(prompts[1], seed=7)) == sampler([prompts[1], prompts[0]], seed=7)[0]


def test_stream_function_with_an_image_stops_at_eos(model, greedy):
  prompts, pixels, _ = _prompts()
  full = greedy(prompts, pixels)[0]
  tokens = stream(model, prompts[0], pixels[:1], max_new_tokens=NEW, eos_ids=(full[4],), pad_id=PAD)
  assert list(tokens) == full[:full.index(full[4])]


def test_sampling_is_reproducible_per_seed_and_tiny_top_p_is_greedy(model, greedy, sampler):
  _, _, prompts = _prompts()
  first = sampler(prompts, seed=7)
  assert sampler(prompts, seed=7) == first
  assert sampler(prompts, seed=8) != first
  assert first != greedy(prompts)
  nucleus = generate(model, prompts, max_new_tokens=NEW, eos_ids=EOS, pad_id=PAD, temperature=1.0, top_p=1e-6,
                     seed=7)
  assert nucleus == greedy(prompts)


def test_top_p_keeps_the_smallest_prefix_holding_p_and_top_k_the_k_largest():
  logits = np.log(np.tile([[0.5, 0.3, 0.15, 0.05]], (2000, 1)))
  draw = jax.jit(sample, static_argnums=2)
  nucleus = np.asarray(draw(logits, jax.random.key(0), Sampling(temperature=1.0, top_p=0.7)))
  assert set(nucleus.tolist()) == {0, 1}
  assert abs((nucleus == 0).mean() - 0.5 / 0.8) < 0.03  # renormalized over the kept tokens
  top3 = np.asarray(draw(logits, jax.random.key(0), Sampling(temperature=1.0, top_k=3)))
  assert set(top3.tolist()) == {0, 1, 2}


def test_decode_loop_compiles_once_for_calls_with_the_same_shapes(model):
  gen = Generator(model, max_new_tokens=4, eos_ids=EOS, temperature=0.7, top_p=0.9, top_k=20)
  _, _, (a, b) = _prompts()
  before = TRACES.copy()
  gen([a, b, a], seed=0)
  gen([b[:3], a + [5, 6], b], seed=1)  # other lengths, same 64-token bucket
  assert TRACES["prefill"] - before["prefill"] == 1 and TRACES["decode"] - before["decode"] == 1


def test_image_placeholder_count_must_match_the_images(greedy):
  prompts, pixels, _ = _prompts()
  with pytest.raises(ValueError, match="12 image placeholders .* 2 image"):
    greedy(prompts, pixels[:2])


def test_prompt_longer_than_the_cache_is_rejected(model):
  gen = Generator(model, max_new_tokens=8, eos_ids=EOS, cache_len=16)
  with pytest.raises(ValueError, match="prompt of 10 tokens .* cache_len=16"):
    gen([[1] * 10])


def test_staged_decode_gives_the_one_stage_tokens(model, greedy):
  """Stages of 1, 4 and 16 tokens in 4-slot cache buckets (the cache grows between them): the same tokens."""
  image_prompts, pixels, _ = _prompts()
  staged = Generator(model, max_new_tokens=NEW, eos_ids=EOS, pad_id=PAD, bucket=4, stage=1)
  assert staged(image_prompts, pixels) == greedy(image_prompts, pixels)
