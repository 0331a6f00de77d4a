"""Grain pipeline: loss on answers only, truncation, packing, order, sharding, resumable state."""

import numpy as np
import pytest

from facellm_jax.input import image as image_lib
from facellm_jax.input import pipeline
from facellm_jax.input import template
from facellm_jax.input import tokenizer as tok_lib

S, N = 14, 4  # image size, placeholders per image
NUM_RECORDS = 24


def _color(i):
  return np.array([(37 * i) % 256, (91 * i + 5) % 256, (13 * i + 200) % 256], np.uint8)


def _answer(i):
  return f"Answer {i}: the person looks" + " fairly" * (i % 7) + f" like {i}."


def _records(n=NUM_RECORDS):
  # Each record's image is one flat color and its answer names its index, so a batch says where
  # every token and every image came from. Text fields mix str and bytes as TFDS returns them.
  return [{
      "image": np.broadcast_to(_color(i), (20 + i % 5, 17, 3)).copy(),
      "image_id": f"img{i:03d}".encode(),
      "question": f"What can you tell about face {i}?".encode() if i % 2 else f"Face {i}: age?",
      "answer": _answer(i),
      "attribute": b"age", "age": b"20-29", "gender": b"Female", "race": b"White", "source": b"synth",
  } for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [_answer(i) for i in range(50)] + ["What can you tell about face? age"] * 20
  return tok_lib.train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def records():
  return _records()


def _dataset(records, tok, **kw):
  args = dict(image_size=S, num_image_tokens=N, seq_len=96, batch_size=3, seed=7,
              process_index=0, process_count=1, read_threads=1)
  args.update(kw)
  return pipeline.make_dataset(records, tok, **args)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _segments(batch):
  """(row, segment_id, token slice) for every example in reading order."""
  for r, seg in enumerate(batch["segment_ids"]):
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      yield r, s, slice(idx[0], idx[-1] + 1)


def _answer_index(tok, batch, r, sl):
  text = tok.decode(batch["targets"][r, sl][batch["loss_mask"][r, sl] > 0])
  assert text.startswith("Answer ") and ":" in text, text
  return int(text.split(":")[0].split()[1]), text


def test_example_loss_tokens_are_the_answer_and_targets_are_the_next_tokens(tok, records):
  ex = pipeline.record_to_example(records[3], tok, image_size=S, num_image_tokens=N, seq_len=200)
  assert tok.decode(ex["targets"][ex["loss_mask"] > 0]) == _answer(3) + "<|im_end|>\n"
  np.testing.assert_array_equal(ex["input_ids"][1:], ex["targets"][:-1])
  assert ex["input_ids"][0] == tok.im_start_id and ex["targets"][-1] == tok.encode("\n")[0]
  assert (ex["input_ids"] == tok.image_token_id).sum() == N
  assert ex["pixel_values"].shape == (1, S, S, 3) and ex["pixel_values"].dtype == np.uint8
  assert (ex["pixel_values"] == _color(3)).all()  # resized; normalized when batched


def test_truncation_cuts_the_answer_from_the_end(tok, records):
  full = pipeline.record_to_example(records[6], tok, image_size=S, num_image_tokens=N, seq_len=200)
  prompt_len = int(np.argmax(full["loss_mask"]))
  short = pipeline.record_to_example(records[6], tok, image_size=S, num_image_tokens=N,
                                     seq_len=prompt_len + 3)
  assert len(short["input_ids"]) == prompt_len + 3
  np.testing.assert_array_equal(short["targets"], full["targets"][:prompt_len + 3])
  assert short["loss_mask"].sum() == 3
  assert _answer(6).startswith(tok.decode(short["targets"][short["loss_mask"] > 0]))
  assert (short["input_ids"] == tok.image_token_id).sum() == N
  assert pipeline.record_to_example(records[6], tok, image_size=S, num_image_tokens=N,
                                    seq_len=prompt_len) is None


def test_truncation_drops_a_cut_image_whole(tok):
  messages = [{"role": "user", "content": "<image>\nFirst?"}, {"role": "assistant", "content": "One."},
              {"role": "user", "content": "<image>\nSecond?"}, {"role": "assistant", "content": "Two."}]
  ids, mask = template.render_conversation(messages, tok, N, num_tiles=[1, 2])
  pixels = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((3, S, S, 3), np.float32)
  (_, _), (second, end) = template.image_spans(ids, tok.image_token_id)
  ex = pipeline.fit_example(ids, mask, pixels, seq_len=second + 2, image_token_id=tok.image_token_id,
                            num_image_tokens=N)
  assert len(ex["input_ids"]) == second - 1  # everything from the second image on is gone
  assert (ex["input_ids"] == tok.image_token_id).sum() == N
  np.testing.assert_array_equal(ex["pixel_values"], pixels[:1])
  assert tok.decode(ex["targets"][ex["loss_mask"] > 0]) == "One.<|im_end|>\n"
  whole = pipeline.fit_example(ids, mask, pixels, seq_len=end, image_token_id=tok.image_token_id,
                               num_image_tokens=N)
  assert (whole["input_ids"] == tok.image_token_id).sum() == 3 * N and len(whole["pixel_values"]) == 3


def test_padded_batches_have_fixed_shapes_and_loss_only_on_answers(tok, records):
  it = iter(_dataset(records, tok, num_epochs=1, shuffle=False))
  batches = list(it)
  assert len(batches) == NUM_RECORDS // 3
  seen = []
  for b in batches:
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "input_ids": ((3, 96), "int32"), "targets": ((3, 96), "int32"),
        "loss_mask": ((3, 96), "float32"), "positions": ((3, 96), "int32"),
        "segment_ids": ((3, 96), "int32"), "pixel_values": ((3, S, S, 3), "float32"),
        "num_images": ((3,), "int32")}
    for r, _, sl in _segments(b):
      i, text = _answer_index(tok, b, r, sl)
      assert text == _answer(i) + "<|im_end|>\n"
      seen.append(i)
    pad = b["segment_ids"] == 0
    assert (b["input_ids"][pad] == tok.pad_id).all() and (b["loss_mask"][pad] == 0).all()
  assert seen == list(range(NUM_RECORDS))


def test_packing_keeps_examples_whole_and_images_in_reading_order(tok, records):
  it = iter(_dataset(records, tok, packing=True, max_images_per_row=4, seq_len=128))
  for b in _take(it, 4):
    order = []
    for r, s, sl in _segments(b):
      seg = b["segment_ids"][r]
      assert seg[sl].min() == s and (np.diff(seg[seg > 0]) >= 0).all()  # contiguous, in order
      np.testing.assert_array_equal(b["positions"][r, sl], np.arange(sl.stop - sl.start))
      np.testing.assert_array_equal(b["input_ids"][r, sl][1:], b["targets"][r, sl][:-1])
      assert b["input_ids"][r, sl.start] == tok.im_start_id
      i, text = _answer_index(tok, b, r, sl)
      assert text == _answer(i) + "<|im_end|>\n"  # never split
      assert (b["input_ids"][r, sl] == tok.image_token_id).sum() == N
      order.append(i)
    assert (b["segment_ids"].max(axis=1) > 1).any()  # several examples share a row
    used = (b["segment_ids"] > 0).sum(axis=1)
    assert all((row[:n] > 0).all() for row, n in zip(b["segment_ids"], used))  # padding at the end
    pad = b["segment_ids"] == 0
    assert (b["input_ids"][pad] == tok.pad_id).all() and not b["loss_mask"][pad].any()
    assert b["num_images"].tolist() == [int(m) for m in b["segment_ids"].max(axis=1)]
    assert ((b["input_ids"] == tok.image_token_id).sum() == N * b["num_images"].sum())
    assert b["pixel_values"].shape == (3 * 4, S, S, 3)
    real = len(order)
    for k, i in enumerate(order):
      np.testing.assert_allclose(b["pixel_values"][k], np.broadcast_to(
          image_lib.normalize(_color(i)), (S, S, 3)), atol=1e-6)
    assert not b["pixel_values"][real:].any()


def test_default_image_slots_let_tokens_decide_the_packing(tok, records):
  packed = next(iter(_dataset(records, tok, packing=True, seq_len=128)))
  slots = 128 // (N + 12)  # the most examples a row could ever hold
  assert packed["pixel_values"].shape == (3 * slots, S, S, 3)
  assert packed["num_images"].max() > 1 and packed["num_images"].max() < slots
  assert next(iter(_dataset(records, tok)))["pixel_values"].shape == (3, S, S, 3)


def test_dynamic_tiling_puts_every_tile_in_the_batch(tok):
  wide = [{"image": np.full((10, 40, 3), 9, np.uint8), "question": "Q?", "answer": _answer(1)}]
  b = next(iter(_dataset(wide, tok, max_tiles=4, max_images_per_row=5, batch_size=1, seq_len=200)))
  assert b["num_images"].tolist() == [5]  # 4 x 1 grid + thumbnail
  assert (b["input_ids"] == tok.image_token_id).sum() == 5 * N
  with pytest.raises(ValueError, match="max_images_per_row=4 cannot hold one example's 5 images"):
    _dataset(wide, tok, max_tiles=4, max_images_per_row=4)


def test_shuffle_is_set_by_the_seed_and_differs_across_epochs(records):
  def ids(seed, **kw):
    return [r["image_id"] for r in pipeline.record_stream(records, seed=seed, num_epochs=2, **kw)]

  first = ids(1)
  epoch1, epoch2 = first[:NUM_RECORDS], first[NUM_RECORDS:]
  assert sorted(epoch1) == sorted(epoch2) == sorted(r["image_id"] for r in records)
  assert epoch1 != epoch2
  assert ids(1) == first and ids(2) != first
  assert ids(1, shuffle=False)[:NUM_RECORDS] == [r["image_id"] for r in records]


def test_same_seed_gives_the_same_batches(tok, records):
  a = _take(iter(_dataset(records, tok, packing=True, max_images_per_row=3)), 3)
  b = _take(iter(_dataset(records, tok, packing=True, max_images_per_row=3)), 3)
  c = _take(iter(_dataset(records, tok, packing=True, max_images_per_row=3, seed=8)), 3)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_process_shards_are_disjoint_and_cover_each_epoch(records):
  count, n = 5, NUM_RECORDS
  shards = [[r["image_id"] for r in pipeline.record_stream(
      records, seed=3, num_epochs=2, process_index=p, process_count=count)] for p in range(count)]
  for epoch in range(2):
    # Process p reads positions p, p + count, ... of the stream of epoch permutations.
    parts = [[x for pos, x in zip(range(p, 2 * n, count), shard) if epoch * n <= pos < (epoch + 1) * n]
             for p, shard in enumerate(shards)]
    flat = [x for part in parts for x in part]
    assert len(flat) == len(set(flat)) == n
    assert sorted(flat) == sorted(r["image_id"] for r in records)
  with pytest.raises(ValueError, match="process_index < process_count"):
    pipeline.record_stream(records, seed=0, process_index=2, process_count=2)


@pytest.mark.parametrize("packing", [False, True])
def test_restored_iterator_state_gives_the_same_next_batches(tok, records, packing):
  ds = _dataset(records, tok, packing=packing, max_images_per_row=3)
  it = iter(ds)
  _take(it, 5)  # crosses the first epoch boundary
  state = it.get_state()
  expected = _take(it, 4)
  resumed = iter(ds)
  resumed.set_state(state)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(expected, _take(resumed, 4)) for k in x)


def test_restored_iterator_state_with_multiprocess_prefetch(tok, records):
  ds = _dataset(records, tok, packing=True, max_images_per_row=3, worker_count=2)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  it.close()
  resumed = iter(ds)
  resumed.set_state(state)
  got = _take(resumed, 3)
  resumed.close()
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(expected, got) for k in x)


def test_examples_whose_prompt_does_not_fit_are_dropped_and_counted(tok, records):
  long_question = dict(records[0], question="face " * 80)
  source = [long_question] + records[1:6]
  it = iter(_dataset(source, tok, shuffle=False, num_epochs=1, batch_size=1))
  answers = [_answer_index(tok, b, 0, slice(None))[0] for b in it]
  assert answers == [1, 2, 3, 4, 5]
  assert pipeline.dropped_examples(it.get_state()) == 1
  with pytest.raises(ValueError, match="do not fit in seq_len=96"):
    next(iter(_dataset([long_question], tok)))


def test_open_tfds_source_explains_a_directory_that_is_not_a_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a TFDS dataset directory"):
    pipeline.open_tfds_source(tmp_path)
