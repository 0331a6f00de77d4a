"""The chat backend against a local fake OpenAI server that misbehaves on purpose."""

import asyncio
import base64
import dataclasses
import io
import logging

import pytest
from PIL import Image

from data_gen.backends import openai_chat
from data_gen.backends.openai_chat import FatalApiError, OpenAIChatBackend
from fake_openai import (
    REFUSAL, Collector, Fault, FakeOpenAI, MemoryMeta, expected_answer, http_date, key_of,
    make_requests, mixed_faults, refused_forever)

MODEL = "gpt-4o-2024-11-20"
FAST = dict(backoff_base=0.01, backoff_max=0.05)


def run(backend, requests):
  emit = Collector()
  asyncio.run(backend.run(requests, emit, MemoryMeta()))
  return emit.results


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
  return make_requests(tmp_path_factory.mktemp("faces"), 12, ("demographics", "pose", "skin"))


def test_every_request_ends_once_with_its_own_answer_under_every_fault(requests):
  with FakeOpenAI(faults=mixed_faults, latency=0.01) as fake:
    results = run(OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 8, **FAST), requests)
    outcomes = {(c.outcome, c.status) for c in fake.chat_calls()}
    assert {("http", 429), ("http", 500), ("http", 503), ("drop", 200), ("malformed", 200),
            ("refuse", 200), ("ok", 200)} <= outcomes
    assert sorted(results) == sorted(r.key for r in requests)
    for request in requests:
      result, key = results[request.key], key_of(request)
      calls = fake.chat_calls(key)
      if refused_forever(key):
        assert (result.status, result.answer) == ("refused", None)
      else:
        assert (result.status, result.answer) == ("ok", expected_answer(request))
      assert result.attempts == len(calls)
      billed = [c for c in calls if c.outcome in ("ok", "refuse")]
      assert result.prompt_tokens == sum(c.prompt_tokens for c in billed) > 0
      assert result.completion_tokens == sum(c.completion_tokens for c in billed) > 0


def test_refusals_are_reasked_then_recorded_as_refused(requests):
  once, always = requests[:2]
  with FakeOpenAI() as fake:
    fake.script(key_of(once), Fault.refuse(), Fault.refuse())
    fake.script(key_of(always), *[Fault.refuse()] * 10)
    backend = OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 2, max_refusal_retries=2)
    results = run(backend, [once, always])
    assert len(fake.chat_calls(key_of(always))) == 3
  assert results[once.key].status == "ok"
  assert results[once.key].answer == expected_answer(once)
  assert results[once.key].attempts == 3
  refused = results[always.key]
  assert (refused.status, refused.answer, refused.attempts) == ("refused", None, 3)
  assert "refused 3 times" in refused.error and REFUSAL[:20] in refused.error


def test_custom_refusal_phrases_replace_the_defaults(requests):
  with FakeOpenAI() as fake:
    fake.script(key_of(requests[0]), Fault.refuse())
    backend = OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 1,
                                refusal_phrases=["Answer for"], max_refusal_retries=1)
    result = run(backend, requests[:1])[requests[0].key]
  # "I'm sorry" is no longer a refusal (stored as an answer); the real answer now is one.
  assert (result.status, result.answer, result.attempts) == ("ok", REFUSAL, 1)


def test_retry_after_is_honoured_in_seconds_milliseconds_and_http_date(requests):
  date, instant = http_date(1.0)
  waits = {key_of(requests[0]): Fault.rate_limit(retry_after="0.4"),
           key_of(requests[1]): Fault.rate_limit(retry_after_ms="300"),
           key_of(requests[2]): Fault.http(503, retry_after="0.3")}
  with FakeOpenAI() as fake:
    for key, fault in waits.items():
      fake.script(key, fault)
    fake.script(key_of(requests[3]), Fault.rate_limit(retry_after=date))
    # One at a time, so one 429's wait does not cover another's; a large backoff, so a retry
    # that came early could only have ignored the header.
    backend = OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 1, backoff_base=5.0)
    results = run(backend, requests[:4])
    gaps = {key: fake.chat_calls(key)[1].t_start - fake.chat_calls(key)[0].t_end for key in waits}
    date_retry = fake.chat_calls(key_of(requests[3]))[1].wall_start
  assert all(r.status == "ok" for r in results.values())
  assert gaps[key_of(requests[0])] >= 0.4
  assert gaps[key_of(requests[1])] >= 0.3
  assert gaps[key_of(requests[2])] >= 0.3
  assert date_retry >= instant - 0.01


def test_a_rate_limit_holds_back_every_worker(requests):
  with FakeOpenAI(latency=0.2) as fake:
    fake.fail_next(Fault.rate_limit(retry_after="1.0"))
    results = run(OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 4, **FAST), requests[:16])
    calls = fake.chat_calls()
  assert all(r.status == "ok" for r in results.values())
  limited = next(c for c in calls if c.status == 429)
  # Requests already on their way may land just after the 429; none may start during the wait.
  during = [c for c in calls if limited.t_end + 0.3 < c.t_start < limited.t_end + 0.95]
  assert not during
  assert any(c.t_start >= limited.t_end + 1.0 for c in calls)


def test_timeouts_are_retried_and_final_client_errors_are_not(requests):
  stalled, bad, missing, flaky = requests[:4]
  with FakeOpenAI() as fake:
    fake.script(key_of(stalled), Fault.stall(1.5))
    fake.script(key_of(bad), Fault.http(400))
    fake.script(key_of(missing), Fault.http(404))
    fake.script(key_of(flaky), Fault.http(500), Fault.http(502), Fault.http(500))
    backend = OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 4, max_retries=2, timeout=0.5,
                                **FAST)
    results = run(backend, [stalled, bad, missing, flaky])
  assert results[stalled.key].status == "ok"
  assert results[stalled.key].attempts == 2
  assert (results[bad.key].status, results[bad.key].attempts) == ("failed", 1)
  assert "HTTP 400" in results[bad.key].error
  assert "HTTP 404" in results[missing.key].error
  assert (results[flaky.key].status, results[flaky.key].attempts) == ("failed", 3)
  assert results[flaky.key].error.startswith("HTTP 500")  # the cause; the attempts are counted


def test_a_rejected_key_stops_the_run_without_revealing_it(requests, caplog):
  secret = "sk-proj-SECRET0123456789abcdef"
  emit = Collector()
  with caplog.at_level(logging.DEBUG), FakeOpenAI() as fake:
    backend = OpenAIChatBackend(MODEL, secret, fake.base_url, 4, **FAST)
    with pytest.raises(FatalApiError, match="rejected the API key") as error:
      asyncio.run(backend.run(requests, emit, MemoryMeta()))
    assert len(fake.chat_calls()) <= 4  # one round of in-flight requests, then stop
  assert secret not in str(error.value) and secret not in repr(backend)
  assert not any(secret in record.getMessage() for record in caplog.records)
  assert not emit.results


def test_an_exhausted_quota_stops_the_run(requests):
  with FakeOpenAI() as fake:
    fake.fail_next(*[Fault.rate_limit(retry_after="0", code="insufficient_quota")] * 4)
    backend = OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 1, **FAST)
    with pytest.raises(FatalApiError, match="no quota left"):
      run(backend, requests[:3])
    assert len(fake.chat_calls()) == 1


def test_redact_removes_the_key_and_key_shaped_strings():
  text = "Incorrect API key provided: sk-abc123DEF456. Also my-own-key-value."
  assert openai_chat.redact(text, "my-own-key-value") == (
      "Incorrect API key provided: sk-[redacted] Also [redacted].")


def test_images_travel_as_base64_jpeg_and_shrink_only_when_asked(tmp_path):
  jpeg, png = tmp_path / "a.jpg", tmp_path / "b.png"
  Image.new("RGB", (300, 200), (200, 120, 40)).save(jpeg, quality=90)
  Image.new("RGB", (300, 200), (10, 120, 240)).save(png)

  def decode(uri):
    prefix, data = uri.split(",", 1)
    assert prefix == "data:image/jpeg;base64"
    return base64.b64decode(data)

  assert decode(openai_chat.image_data_uri(str(jpeg))) == jpeg.read_bytes()
  assert decode(openai_chat.image_data_uri(str(jpeg), max_side=400)) == jpeg.read_bytes()
  small = Image.open(io.BytesIO(decode(openai_chat.image_data_uri(str(jpeg), max_side=150))))
  assert (small.format, small.size) == ("JPEG", (150, 100))
  converted = Image.open(io.BytesIO(decode(openai_chat.image_data_uri(str(png)))))
  assert (converted.format, converted.size) == ("JPEG", (300, 200))


def test_an_unreadable_image_fails_its_request_without_a_call(requests, tmp_path):
  (tmp_path / "broken.png").write_bytes(b"not an image")
  bad = [dataclasses.replace(requests[0], image_path=str(tmp_path / "gone.jpg")),
         dataclasses.replace(requests[1], image_path=str(tmp_path / "broken.png"))]
  with FakeOpenAI() as fake:
    results = run(OpenAIChatBackend(MODEL, fake.api_key, fake.base_url, 2, **FAST), bad)
    assert not fake.chat_calls()
  for request in bad:
    result = results[request.key]
    assert (result.status, result.attempts) == ("failed", 0)
    assert result.error.startswith(f"cannot read image {request.image_path}")


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after": "2"}, 2.0),
    ({"retry-after": "0.25"}, 0.25),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
    ({"retry-after": "soon"}, None),
    ({}, None),
])
def test_retry_after_header_forms(headers, expected):
  assert openai_chat.retry_after_seconds(headers) == expected


def test_retry_after_http_date_is_the_time_until_that_instant():
  date, _ = http_date(5.0)
  assert 4.0 < openai_chat.retry_after_seconds({"retry-after": date}) <= 7.0


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't help with identifying people.", True),
    ("I\u2019m unable to describe this image.", True),
    ("The face is oval. " * 10 + "I'm unable to see the ears clearly.", False),
    ("The woman has high cheekbones and a neutral expression.", False),
])
def test_refusals_are_recognised_by_their_opening(text, refused):
  assert openai_chat.is_refusal(text) == refused


def test_backoff_grows_to_its_ceiling_and_yields_to_retry_after():
  backoff = openai_chat.Backoff(base=1.0, ceiling=8.0)
  assert 0.5 <= backoff.delay(1) <= 1.0
  assert 4.0 <= backoff.delay(4) <= 8.0
  assert 4.0 <= backoff.delay(30) <= 8.0
  assert 3.0 <= backoff.delay(1, retry_after=3.0) <= 4.0
