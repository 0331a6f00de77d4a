"""A local OpenAI-compatible server for tests: chat completions, files and batches, with faults.

Real API calls cost money and cannot be made from CI, so tests point the real `openai` client
at this server (`base_url=fake.base_url`). It listens on 127.0.0.1 (a free port) in a daemon
thread, one thread per connection, so concurrent requests really overlap.

    with FakeOpenAI(latency=0.05) as fake:
      fake.script(request_key(jpeg_bytes, user_prompt), Fault.rate_limit(retry_after="0.2"))
      backend = OpenAIChatBackend("gpt-4o-2024-11-20", fake.api_key, fake.base_url, 8)
      ...
      assert fake.chat_calls(key)[1].t_start >= fake.chat_calls(key)[0].t_end + 0.2

Answers identify their request. A request's key is `request_key(image_bytes, user_prompt)`
(hashes of the JPEG bytes in the data URI and of the user text); the answer is
`answer_for(image_bytes, user_prompt)`, which contains the key, so a test can check that each
stored answer belongs to its (image, attribute). Usage is deterministic: `prompt_tokens` is
`IMAGE_TOKENS` + the words of the system and user text, `completion_tokens` the answer's words.

Endpoints: POST /v1/chat/completions, POST /v1/files (multipart, purpose "batch"),
GET /v1/files/{id}/content, POST /v1/batches, GET /v1/batches, GET /v1/batches/{id}.
Requests without `Authorization: Bearer <api_key>` get a 401 whose message echoes the key they
sent (as careless servers do), so tests can check that clients never pass it on.

Faults (`Fault.*`): `script(key, *faults)` queues faults for that key's next requests (chat or
batch items), in order; `fail_next(*faults)` queues faults for the next chat requests whatever
their key; the `faults` constructor argument (e.g. `mixed_faults`) gives every new key its first
script. After its script, a key gets normal answers. In a batch, a chat fault becomes that
item's error line (HTTP faults keep their status, drop/malformed become `server_error`,
stall is ignored). `lose_next_response(path)` carries out the next request to `path` (e.g.
"/v1/batches") but cuts its response off, as when a reply is lost after the server acted.
`end_next_batch(status)` makes the next batch to finish end "failed", "expired" (the second
half of its items unanswered) or "cancelled" (likewise). A batch finishes on its
`batch_polls`-th retrieve.

Test helpers: `make_requests(directory, num_images, attributes)` writes small distinct JPEG
faces and returns one `Request` per (image, attribute); `MemoryMeta` is an in-memory MetaStore;
`Collector` is an `emit` that keeps every Result (and fails the test on a duplicate).

Log: `calls` holds every request in arrival order (`Call`: path, key, outcome, status,
t_start/t_end monotonic, wall_start/wall_end wall-clock, billed tokens, retry_after);
`chat_calls(key)` filters chat completions; `batches` maps batch id -> its JSON object.
"""

from __future__ import annotations

import base64
import dataclasses
import email.parser
import email.policy
import email.utils
import hashlib
import http.server
import json
import socket
import threading
import time
import urllib.parse
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from data_gen.backends.base import Request, Result

API_KEY = "sk-test-fake-0123456789abcdefXYZ"
IMAGE_TOKENS = 85
REFUSAL = "I'm sorry, but I can't help with that request."


@dataclasses.dataclass(frozen=True)
class Fault:
  """One scripted misbehaviour. Build with the class methods."""

  kind: str  # http | drop | malformed | refuse | stall
  status: int = 200
  headers: tuple[tuple[str, str], ...] = ()
  seconds: float = 0.0
  code: str | None = None

  @classmethod
  def rate_limit(cls, retry_after: str | None = None, retry_after_ms: str | None = None,
                 code: str = "rate_limit_exceeded") -> Fault:
    """A 429; `retry_after` is sent verbatim (seconds or an HTTP-date)."""
    headers = []
    if retry_after is not None:
      headers.append(("Retry-After", retry_after))
    if retry_after_ms is not None:
      headers.append(("retry-after-ms", retry_after_ms))
    return cls("http", 429, tuple(headers), code=code)

  @classmethod
  def http(cls, status: int, retry_after: str | None = None) -> Fault:
    headers = (("Retry-After", retry_after),) if retry_after is not None else ()
    return cls("http", status, headers)

  @classmethod
  def drop(cls) -> Fault:
    """Headers and half a body, then the connection closes."""
    return cls("drop")

  @classmethod
  def malformed(cls) -> Fault:
    """HTTP 200 with a truncated JSON body."""
    return cls("malformed")

  @classmethod
  def refuse(cls) -> Fault:
    """A billed 200 answer whose text is `REFUSAL`."""
    return cls("refuse")

  @classmethod
  def stall(cls, seconds: float) -> Fault:
    """Answer normally after `seconds` (longer than the client's timeout)."""
    return cls("stall", seconds=seconds)


@dataclasses.dataclass
class Call:
  method: str
  path: str
  key: str | None = None
  outcome: str = "ok"  # ok | refuse | http | drop | malformed | stall | unauthorized
  status: int = 200
  t_start: float = 0.0
  t_end: float = 0.0
  wall_start: float = 0.0
  wall_end: float = 0.0
  prompt_tokens: int = 0
  completion_tokens: int = 0
  retry_after: str | None = None


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:12]


def request_key(image_bytes: bytes, user_prompt: str) -> str:
  return f"{_sha(image_bytes)}-{_sha(user_prompt.encode())}"


def answer_for(image_bytes: bytes, user_prompt: str) -> str:
  key = request_key(image_bytes, user_prompt)
  return f"Answer for {key}: the face shows an even, frontal view with soft lighting."


def mixed_faults(key: str) -> list[Fault]:
  """Every fault kind over a set of keys, chosen by the key's hash (so tests can predict it).

  One key in 9 is refused forever (more refusals than any sane retry limit); see
  `refused_forever`. All other faults clear after one or two tries.
  """
  return [
      [],
      [Fault.rate_limit(retry_after_ms="50")],
      [Fault.http(500)],
      [Fault.http(503, retry_after="0")],
      [Fault.drop()],
      [Fault.malformed()],
      [Fault.refuse()],
      [Fault.rate_limit(retry_after="0"), Fault.malformed()],
      [Fault.refuse()] * 100,
  ][_bucket(key)]


def refused_forever(key: str) -> bool:
  return _bucket(key) == 8


def _bucket(key: str) -> int:
  return int(_sha(key.encode()), 16) % 9


def _parse_chat_body(body: dict) -> tuple[str, bytes, str, str]:
  """Returns (system text, image bytes, user text, model) of a chat completion request."""
  system, user, image = "", "", b""
  for message in body.get("messages", []):
    content = message.get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
    for part in parts:
      if part.get("type") == "text":
        if message.get("role") == "system":
          system += part["text"]
        else:
          user += part["text"]
      elif part.get("type") == "image_url":
        url = part["image_url"]["url"]
        image = base64.b64decode(url.split(",", 1)[1])
  return system, image, user, body.get("model", "")


class FakeOpenAI:
  """The server; a context manager (starts on enter, stops on exit)."""

  def __init__(self, *, latency: float = 0.0,
               faults: Callable[[str], Sequence[Fault]] | None = None, api_key: str = API_KEY,
               batch_polls: int = 2):
    self.latency = latency
    self.api_key = api_key
    self.batch_polls = batch_polls
    self.calls: list[Call] = []
    self.batches: dict[str, dict] = {}
    self.files: dict[str, bytes] = {}
    self._initial_faults = faults
    self._scripts: dict[str, list[Fault]] = {}
    self._next: list[Fault] = []
    self._batch_endings: list[str] = []
    self._lost: list[str] = []
    self._batch_members: dict[str, list[dict]] = {}
    self._batch_polls: dict[str, int] = {}
    self._lock = threading.Lock()
    self._counter = 0
    fake = self

    class Handler(_Handler):
      server_fake = fake

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self._server.handle_error = lambda request, address: None  # clients that hang up are expected
    self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

  def __enter__(self) -> FakeOpenAI:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._server.shutdown()
    self._server.server_close()

  # Scripting.
  def script(self, key: str, *faults: Fault) -> None:
    with self._lock:
      self._scripts.setdefault(key, self._first_script(key)).extend(faults)

  def fail_next(self, *faults: Fault) -> None:
    with self._lock:
      self._next.extend(faults)

  def lose_next_response(self, path: str) -> None:
    with self._lock:
      self._lost.append(path)

  def _take_lost(self, path: str) -> bool:
    with self._lock:
      if path in self._lost:
        self._lost.remove(path)
        return True
      return False

  def end_next_batch(self, status: str) -> None:
    assert status in ("failed", "expired", "cancelled"), status
    with self._lock:
      self._batch_endings.append(status)

  def chat_calls(self, key: str | None = None) -> list[Call]:
    with self._lock:
      return [c for c in self.calls
              if c.path.endswith("/chat/completions") and (key is None or c.key == key)]

  def batch_creations(self) -> int:
    with self._lock:
      return sum(c.method == "POST" and c.path == "/v1/batches" for c in self.calls)

  def _first_script(self, key: str) -> list[Fault]:
    return list(self._initial_faults(key)) if self._initial_faults else []

  def _take_fault(self, key: str, global_queue: bool) -> Fault | None:
    with self._lock:
      if global_queue and self._next:
        return self._next.pop(0)
      script = self._scripts.setdefault(key, self._first_script(key))
      return script.pop(0) if script else None

  def _new_id(self, prefix: str) -> str:
    with self._lock:
      self._counter += 1
      return f"{prefix}{self._counter}"

  # Answers.
  def _completion(self, body: dict, call: Call, refuse: bool) -> dict:
    system, image, user, model = _parse_chat_body(body)
    text = REFUSAL if refuse else answer_for(image, user)
    call.prompt_tokens = IMAGE_TOKENS + len(system.split()) + len(user.split())
    call.completion_tokens = len(text.split())
    return {
        "id": self._new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text, "refusal": None}}],
        "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                  "total_tokens": call.prompt_tokens + call.completion_tokens},
    }

  def _finish_batch(self, batch: dict) -> None:
    """Answers every line of a batch's input file and writes its output and error files."""
    with self._lock:
      ending = self._batch_endings.pop(0) if self._batch_endings else "completed"
    now = int(time.time())
    batch.update(status=ending, completed_at=now)
    if ending == "failed":
      batch["errors"] = {"object": "list", "data": [
          {"code": "invalid_request", "message": "Injected batch failure.", "line": 1}]}
      return
    lines = self._batch_members[batch["id"]]
    answered = lines if ending == "completed" else lines[:len(lines) // 2]
    out, err = [], []
    for line in answered:
      system, image, user, _ = _parse_chat_body(line["body"])
      call = Call("BATCH", "/v1/chat/completions", key=request_key(image, user))
      fault = self._take_fault(call.key, global_queue=False)
      entry = {"id": self._new_id("batch_req_"), "custom_id": line["custom_id"], "error": None}
      if fault is None or fault.kind in ("refuse", "stall"):
        call.outcome = "refuse" if fault and fault.kind == "refuse" else "ok"
        completion = self._completion(line["body"], call, refuse=call.outcome == "refuse")
        entry["response"] = {"status_code": 200, "request_id": entry["id"], "body": completion}
        out.append(entry)
      elif fault.kind == "http":
        call.outcome, call.status = "http", fault.status
        entry["response"] = {"status_code": fault.status, "request_id": entry["id"],
                             "body": {"error": {"message": "Injected error.", "code": fault.code}}}
        err.append(entry)
      else:
        call.outcome = fault.kind
        entry["response"] = None
        entry["error"] = {"code": "server_error", "message": f"Injected {fault.kind}."}
        err.append(entry)
      with self._lock:
        self.calls.append(call)
    for line in lines[len(answered):]:
      if ending == "expired":
        err.append({"id": self._new_id("batch_req_"), "custom_id": line["custom_id"],
                    "response": None,
                    "error": {"code": "batch_expired", "message": "This request could not be "
                              "executed before the completion window expired."}})
    for field, entries in (("output_file_id", out), ("error_file_id", err)):
      if entries:
        file_id = self._new_id("file-")
        self.files[file_id] = "".join(json.dumps(e) + "\n" for e in entries).encode()
        batch[field] = file_id
    batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs (~40 ms a reply)
  server_fake: FakeOpenAI

  def log_message(self, *args) -> None:
    pass

  def _send(self, status: int, payload: object | bytes, headers: Sequence[tuple[str, str]] = (),
            content_type: str = "application/json") -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if self.server_fake._take_lost(urllib.parse.urlsplit(self.path).path):
      self._cut_off()
      return
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(data)))
    for name, value in headers:
      self.send_header(name, value)
    self.end_headers()
    self.wfile.write(data)

  def _cut_off(self) -> None:
    """Headers and part of a body, then the connection closes."""
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", "400")
    self.end_headers()
    self.wfile.write(b'{"id": "cut-off", "choices": [')
    self.wfile.flush()
    self.connection.shutdown(socket.SHUT_RDWR)
    self.close_connection = True

  def _error(self, status: int, message: str, code: str | None = None,
             headers: Sequence[tuple[str, str]] = ()) -> None:
    self._send(status, {"error": {"message": message, "type": "fake_error", "code": code}}, headers)

  def do_GET(self) -> None:
    self._dispatch("GET")

  def do_POST(self) -> None:
    self._dispatch("POST")

  def _dispatch(self, method: str) -> None:
    fake = self.server_fake
    url = urllib.parse.urlsplit(self.path)
    call = Call(method, url.path, t_start=time.monotonic(), wall_start=time.time())
    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    with fake._lock:
      fake.calls.append(call)
    try:
      sent_key = self.headers.get("Authorization", "").removeprefix("Bearer ")
      if sent_key != fake.api_key:
        call.outcome, call.status = "unauthorized", 401
        self._error(401, f"Incorrect API key provided: {sent_key}.", "invalid_api_key")
      elif method == "POST" and url.path == "/v1/chat/completions":
        self._chat(json.loads(body), call)
      elif method == "POST" and url.path == "/v1/files":
        self._upload(body)
      elif method == "GET" and url.path.startswith("/v1/files/") and url.path.endswith("/content"):
        file_id = url.path.split("/")[3]
        if file_id in fake.files:
          self._send(200, fake.files[file_id], content_type="application/octet-stream")
        else:
          self._error(404, f"No such file: {file_id}")
      elif method == "POST" and url.path == "/v1/batches":
        self._create_batch(json.loads(body))
      elif method == "GET" and url.path == "/v1/batches":
        self._list_batches(urllib.parse.parse_qs(url.query))
      elif method == "GET" and url.path.startswith("/v1/batches/"):
        self._retrieve_batch(url.path.split("/")[3])
      else:
        self._error(404, f"Unknown endpoint {method} {url.path}")
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    finally:
      call.t_end, call.wall_end = time.monotonic(), time.time()

  def _chat(self, body: dict, call: Call) -> None:
    fake = self.server_fake
    _, image, user, _ = _parse_chat_body(body)
    call.key = request_key(image, user)
    if fake.latency:
      time.sleep(fake.latency)
    fault = fake._take_fault(call.key, global_queue=True)
    call.outcome = fault.kind if fault else "ok"
    if fault is None or fault.kind in ("refuse", "stall"):
      time.sleep(fault.seconds if fault else 0.0)
      self._send(200, fake._completion(body, call, refuse=call.outcome == "refuse"))
    elif fault.kind == "http":
      call.status = fault.status
      call.retry_after = dict(fault.headers).get("Retry-After")
      self._error(fault.status, f"Injected HTTP {fault.status}.", fault.code, fault.headers)
    elif fault.kind == "drop":
      self._cut_off()
    else:  # malformed
      self._send(200, b'{"id": "chatcmpl-bad", "object": "chat.completion", "choices": [{"mess')

  def _upload(self, body: bytes) -> None:
    fake = self.server_fake
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
    fields = {part.get_param("name", header="content-disposition"): part
              for part in message.iter_parts()}
    purpose = fields["purpose"].get_payload(decode=True).decode()
    data = fields["file"].get_payload(decode=True)
    file_id = fake._new_id("file-")
    fake.files[file_id] = data
    self._send(200, {"id": file_id, "object": "file", "bytes": len(data),
                     "created_at": int(time.time()), "filename": fields["file"].get_filename(),
                     "purpose": purpose, "status": "processed"})

  def _create_batch(self, body: dict) -> None:
    fake = self.server_fake
    if body.get("input_file_id") not in fake.files:
      self._error(400, f"Input file {body.get('input_file_id')} not found.")
      return
    lines = [json.loads(line) for line in fake.files[body["input_file_id"]].splitlines() if line]
    batch_id = fake._new_id("batch_")
    batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
             "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
             "status": "validating", "created_at": int(time.time()), "output_file_id": None,
             "error_file_id": None, "errors": None, "metadata": body.get("metadata"),
             "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
    with fake._lock:
      fake.batches[batch_id] = batch
      fake._batch_members[batch_id] = lines
      fake._batch_polls[batch_id] = 0
    self._send(200, batch)

  def _list_batches(self, query: dict[str, list[str]]) -> None:
    fake = self.server_fake
    with fake._lock:
      newest_first = list(reversed(fake.batches.values()))
    if "after" in query:
      ids = [b["id"] for b in newest_first]
      newest_first = newest_first[ids.index(query["after"][0]) + 1:]
    limit = int(query.get("limit", ["20"])[0])
    page = newest_first[:limit]
    self._send(200, {"object": "list", "data": page, "has_more": len(newest_first) > limit,
                     "first_id": page[0]["id"] if page else None,
                     "last_id": page[-1]["id"] if page else None})

  def _retrieve_batch(self, batch_id: str) -> None:
    fake = self.server_fake
    batch = fake.batches.get(batch_id)
    if batch is None:
      self._error(404, f"No such batch: {batch_id}")
      return
    with fake._lock:
      fake._batch_polls[batch_id] += 1
      finish = batch["status"] in ("validating", "in_progress") and (
          fake._batch_polls[batch_id] >= fake.batch_polls)
      if finish:
        batch["status"] = "finalizing"
      elif batch["status"] == "validating":
        batch["status"] = "in_progress"
    if finish:
      fake._finish_batch(batch)
    self._send(200, batch)


def http_date(seconds_from_now: float) -> tuple[str, float]:
  """An HTTP-date for Retry-After and the wall-clock instant it names (whole seconds)."""
  instant = float(int(time.time() + seconds_from_now) + 1)
  return email.utils.formatdate(instant, usegmt=True), instant


class MemoryMeta:
  """A MetaStore in a dict (the journal's stands in for it in the driver)."""

  def __init__(self):
    self.values: dict[str, str] = {}

  def get(self, key: str) -> str | None:
    return self.values.get(key)

  def set(self, key: str, value: str) -> None:
    self.values[key] = value


class Collector:
  """An async `emit` that keeps results by key and refuses a second result for a key."""

  def __init__(self):
    self.results: dict[tuple[str, str], Result] = {}

  async def __call__(self, result: Result) -> None:
    assert result.key not in self.results, f"second result for {result.key}"
    self.results[result.key] = result


def make_requests(directory, num_images: int, attributes: Sequence[str] = ("demographics",),
                  seed: int = 0) -> list[Request]:
  """Writes `num_images` small random JPEGs; returns one Request per (image, attribute)."""
  rng = np.random.default_rng(seed)
  requests = []
  for i in range(num_images):
    path = f"{directory}/{i}.jpg"
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, quality=90)
    labels = {"age": ["20-29", "3-9", "more than 70"][i % 3], "gender": ["Male", "Female"][i % 2],
              "race": "East Asian"}
    for attribute in attributes:
      requests.append(Request(
          image_id=f"val/{i}.jpg", attribute=attribute, image_path=path,
          system_prompt="You are a face analysis assistant. Describe only visible traits.",
          user_prompt=(f"Describe the {attribute} of this {labels['gender']} person aged "
                       f"{labels['age']} ({labels['race']})."),
          labels=labels))
  return requests


def key_of(request: Request) -> str:
  """The fake server's key for a request (its JPEG bytes are sent unchanged)."""
  with open(request.image_path, "rb") as f:
    return request_key(f.read(), request.user_prompt)


def expected_answer(request: Request) -> str:
  with open(request.image_path, "rb") as f:
    return answer_for(f.read(), request.user_prompt)
