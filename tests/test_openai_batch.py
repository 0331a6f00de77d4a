"""The Batch API backend end to end against the local fake server: files, batches, resume."""

import asyncio
import dataclasses
import json

import pytest

from data_gen.backends import pricing
from data_gen.backends.openai_batch import JOURNAL_KEY, OpenAIBatchBackend
from data_gen.backends.openai_chat import FatalApiError
from fake_openai import (
    Collector, Fault, FakeOpenAI, MemoryMeta, expected_answer, key_of, make_requests)

MODEL = "gpt-4o-2024-11-20"


def backend_for(fake, **kwargs):
  kwargs = {"poll_interval": 0.01, "backoff_base": 0.01, "backoff_max": 0.05, **kwargs}
  return OpenAIBatchBackend(MODEL, fake.api_key, fake.base_url, **kwargs)


def journal(meta):
  return json.loads(meta.get(JOURNAL_KEY) or "[]")


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
  return make_requests(tmp_path_factory.mktemp("faces"), 8, ("demographics", "pose"))


def test_batch_round_trip_matches_answers_and_retries_failed_items(requests):
  server_error, dropped, refused_once, refused_always, bad, hopeless = requests[:6]
  with FakeOpenAI() as fake:
    fake.script(key_of(server_error), Fault.http(500))
    fake.script(key_of(dropped), Fault.drop())
    fake.script(key_of(refused_once), Fault.refuse())
    fake.script(key_of(refused_always), *[Fault.refuse()] * 5)
    fake.script(key_of(bad), Fault.http(400))
    fake.script(key_of(hopeless), *[Fault.http(503)] * 5)
    emit, meta = Collector(), MemoryMeta()
    asyncio.run(backend_for(fake, max_item_retries=2, max_refusal_retries=2).run(
        requests, emit, meta))
    first_batch = next(iter(fake.batches.values()))
    first_input = fake.files[first_batch["input_file_id"]].decode().splitlines()
    batch_calls = [c for c in fake.calls if c.method == "BATCH"]

  assert fake.batch_creations() == 3  # the first round, then two rounds of retries
  assert sorted(json.loads(line)["custom_id"] for line in first_input) == sorted(
      r.custom_id for r in requests)
  line = json.loads(first_input[0])
  assert (line["method"], line["url"], line["body"]["model"]) == (
      "POST", "/v1/chat/completions", MODEL)
  image_part = line["body"]["messages"][1]["content"][1]
  assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
  assert sorted(emit.results) == sorted(r.key for r in requests)
  statuses = {r.key: emit.results[r.key].status for r in requests}
  assert statuses == {
      **{r.key: "ok" for r in requests}, refused_always.key: "refused", bad.key: "failed",
      hopeless.key: "failed"}
  for request in requests:
    result = emit.results[request.key]
    if result.status == "ok":
      assert result.answer == expected_answer(request)
    else:
      assert result.answer is None
    billed = [c for c in batch_calls if c.key == key_of(request) and c.outcome in ("ok", "refuse")]
    assert result.prompt_tokens == sum(c.prompt_tokens for c in billed)
    assert result.completion_tokens == sum(c.completion_tokens for c in billed)
  assert emit.results[server_error.key].attempts == 2
  assert emit.results[refused_once.key].attempts == 2
  assert emit.results[refused_always.key].attempts == 3
  assert (emit.results[bad.key].attempts, emit.results[hopeless.key].attempts) == (1, 3)
  assert "HTTP 400" in emit.results[bad.key].error
  assert "HTTP 503" in emit.results[hopeless.key].error
  assert journal(meta) == []


def test_a_restarted_run_resumes_the_journaled_batch_instead_of_paying_twice(requests):
  with FakeOpenAI(batch_polls=30) as fake:
    meta, first_emit = MemoryMeta(), Collector()

    async def crash_once_journaled():
      task = asyncio.create_task(backend_for(fake, poll_interval=0.02).run(
          requests, first_emit, meta))
      while not any(record["batch_id"] for record in journal(meta)):
        await asyncio.sleep(0.01)
      task.cancel()  # the process dies while polling
      with pytest.raises(asyncio.CancelledError):
        await task

    asyncio.run(crash_once_journaled())
    assert not first_emit.results
    emit = Collector()
    asyncio.run(backend_for(fake).run(requests, emit, meta))  # a fresh backend, same journal
    assert fake.batch_creations() == 1
  assert sorted(emit.results) == sorted(r.key for r in requests)
  assert all(emit.results[r.key].answer == expected_answer(r) for r in requests)
  assert journal(meta) == []


def test_a_crash_between_create_and_journal_adopts_the_batch_the_server_made(requests):
  class Crash(Exception):
    pass

  class CrashAfterCreate(MemoryMeta):
    def set(self, key, value):
      if any(record["batch_id"] for record in json.loads(value)):
        raise Crash  # killed before the batch id reached the journal
      super().set(key, value)

  with FakeOpenAI() as fake:
    crashing = CrashAfterCreate()
    with pytest.raises(Crash):
      asyncio.run(backend_for(fake).run(requests, Collector(), crashing))
    assert [r["batch_id"] for r in journal(crashing)] == [None]
    meta = MemoryMeta()
    meta.values = dict(crashing.values)
    emit = Collector()
    asyncio.run(backend_for(fake).run(requests, emit, meta))
    assert fake.batch_creations() == 1
  assert all(emit.results[r.key].answer == expected_answer(r) for r in requests)


def test_a_lost_create_response_adopts_the_batch_instead_of_creating_another(requests):
  with FakeOpenAI() as fake:
    fake.lose_next_response("/v1/batches")
    emit = Collector()
    asyncio.run(backend_for(fake).run(requests, emit, MemoryMeta()))
    assert fake.batch_creations() == 1
    assert [c.path for c in fake.calls if c.method == "GET"].count("/v1/batches") == 1
  assert all(emit.results[r.key].answer == expected_answer(r) for r in requests)


def test_a_journaled_upload_whose_batch_was_never_created_is_dropped(requests):
  with FakeOpenAI() as fake:
    meta = MemoryMeta()
    meta.set(JOURNAL_KEY, json.dumps([{"input_file_id": "file-404", "batch_id": None,
                                       "since": 0.0}]))
    emit = Collector()
    asyncio.run(backend_for(fake).run(requests[:3], emit, meta))
    assert fake.batch_creations() == 1
  assert [r.status for r in emit.results.values()] == ["ok"] * 3


def test_a_journaled_batch_the_server_no_longer_has_is_submitted_again(requests):
  with FakeOpenAI() as fake:
    meta = MemoryMeta()
    meta.set(JOURNAL_KEY, json.dumps([{"input_file_id": "file-0", "batch_id": "batch_gone",
                                       "since": 0.0}]))
    emit = Collector()
    asyncio.run(backend_for(fake).run(requests[:3], emit, meta))
    assert fake.batch_creations() == 1
  assert [r.status for r in emit.results.values()] == ["ok"] * 3
  assert journal(meta) == []


@pytest.mark.parametrize("ending", ["failed", "expired"])
def test_failed_and_expired_batches_are_resubmitted(requests, ending):
  with FakeOpenAI() as fake:
    fake.end_next_batch(ending)
    emit = Collector()
    asyncio.run(backend_for(fake).run(requests, emit, MemoryMeta()))
    assert fake.batch_creations() == 2
    second_batch = list(fake.batches.values())[1]
    second_round = fake.files[second_batch["input_file_id"]].decode().splitlines()
  assert len(second_round) == (len(requests) if ending == "failed" else len(requests) // 2)
  assert all(emit.results[r.key].answer == expected_answer(r) for r in requests)
  retried = [r for r in emit.results.values() if r.attempts == 2]
  assert len(retried) == len(second_round)


def test_a_cancelled_batch_keeps_its_answers_and_is_not_resubmitted(requests):
  with FakeOpenAI() as fake:
    fake.end_next_batch("cancelled")
    emit = Collector()
    asyncio.run(backend_for(fake).run(requests, emit, MemoryMeta()))
    assert fake.batch_creations() == 1
  statuses = sorted(r.status for r in emit.results.values())
  assert statuses == ["failed"] * 8 + ["ok"] * 8
  assert all("ended cancelled" in r.error for r in emit.results.values() if r.status == "failed")


def test_large_runs_are_split_into_several_batches(requests):
  with FakeOpenAI() as fake:
    emit = Collector()
    asyncio.run(backend_for(fake, max_batch_requests=6).run(requests, emit, MemoryMeta()))
    sizes = [b["request_counts"]["total"] for b in fake.batches.values()]
  assert sizes == [6, 6, 4]
  assert all(emit.results[r.key].answer == expected_answer(r) for r in requests)


def test_a_rejected_key_stops_the_batch_run_without_revealing_it(requests):
  secret = "sk-proj-SECRET0123456789abcdef"
  with FakeOpenAI() as fake:
    backend = OpenAIBatchBackend(MODEL, secret, fake.base_url, poll_interval=0.01)
    with pytest.raises(FatalApiError, match="rejected the API key") as error:
      asyncio.run(backend.run(requests, Collector(), MemoryMeta()))
    assert not fake.batches
  assert secret not in str(error.value)


def test_batch_pricing_is_half_the_chat_price():
  chat = pricing.estimate_cost_usd(MODEL, 1_000_000, 100_000, batch=False)
  assert chat == pytest.approx(2.50 + 1.00)
  assert pricing.estimate_cost_usd(MODEL, 1_000_000, 100_000, batch=True) == pytest.approx(1.75)
  assert pricing.estimate_cost_usd("gpt-4o-mini", 2_000_000, 0, batch=False) == pytest.approx(0.30)
  assert pricing.estimate_cost_usd("local-vllm-model", 10, 10, batch=True) is None



def test_a_journaled_batch_does_not_answer_a_request_whose_inputs_changed_since(requests):
  """The batch line's custom_id carries the request's fingerprint: after a label edit, the old
  batch still settles the unchanged requests, and the changed one is sent again."""
  before = [dataclasses.replace(r, inputs=f"{i:064x}") for i, r in enumerate(requests[:4])]
  changed = dataclasses.replace(before[1], user_prompt=before[1].user_prompt + " (relabelled)",
                                inputs="f" * 64)
  after = [before[0], changed, *before[2:]]
  with FakeOpenAI(batch_polls=30) as fake:
    meta = MemoryMeta()

    async def crash_once_journaled():
      task = asyncio.create_task(backend_for(fake, poll_interval=0.02).run(before, Collector(),
                                                                           meta))
      while not any(record["batch_id"] for record in journal(meta)):
        await asyncio.sleep(0.01)
      task.cancel()
      with pytest.raises(asyncio.CancelledError):
        await task

    asyncio.run(crash_once_journaled())
    emit = Collector()
    asyncio.run(backend_for(fake).run(after, emit, meta))
    assert fake.batch_creations() == 2
    second = list(fake.batches.values())[1]
    resent = [json.loads(line)["custom_id"]
              for line in fake.files[second["input_file_id"]].decode().splitlines()]
  assert resent == [changed.custom_id]
  assert all(emit.results[r.key].answer == expected_answer(r) for r in after)
