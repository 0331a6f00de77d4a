"""Journal: final results are never replaced, failed ones are, and a SIGKILL loses nothing."""

import signal
import sqlite3
import subprocess
import sys

import pytest

from data_gen.backends.base import Result
from data_gen.journal import Journal


def test_final_results_are_never_overwritten(tmp_path):
  with Journal(str(tmp_path / "j.sqlite")) as journal:
    assert journal.record(Result("a.jpg", "pose", "ok", answer="frontal"), "offline")
    assert journal.record(Result("b.jpg", "pose", "refused", error="sorry"), "openai")
    assert not journal.record(Result("a.jpg", "pose", "failed", error="503"), "openai")
    assert not journal.record(Result("b.jpg", "pose", "ok", answer="left"), "openai")
    rows = {(r["image_id"], r["attribute"]): r for r in journal.rows()}
    assert rows[("a.jpg", "pose")]["answer"] == "frontal"
    assert rows[("b.jpg", "pose")]["status"] == "refused"
    assert rows[("b.jpg", "pose")]["answer"] is None
    assert journal.final_inputs() == {("a.jpg", "pose"): None, ("b.jpg", "pose"): None}


def test_failed_results_are_retried_and_their_tokens_kept(tmp_path):
  with Journal(str(tmp_path / "j.sqlite")) as journal:
    journal.record(Result("a.jpg", "pose", "failed", prompt_tokens=100, error="timeout"), "x")
    assert journal.final_inputs() == {}
    assert journal.record(Result("a.jpg", "pose", "ok", answer="frontal", prompt_tokens=120,
                                 completion_tokens=30, attempts=2), "openai")
    (row,) = journal.rows("ok")
    assert (row["answer"], row["source"], row["error"]) == ("frontal", "openai", None)
    assert (row["prompt_tokens"], row["completion_tokens"], row["attempts"]) == (220, 30, 3)
    assert journal.summary() == {"ok": 1, "refused": 0, "failed": 0, "prompt_tokens": 220,
                                 "completion_tokens": 30}
    assert journal.summary([("other.jpg", "pose")])["ok"] == 0


def test_a_final_result_is_replaced_only_by_one_made_from_other_inputs(tmp_path):
  with Journal(str(tmp_path / "j.sqlite")) as journal:
    assert journal.record(Result("a.jpg", "pose", "ok", answer="old", prompt_tokens=10), "x", "v1")
    assert not journal.record(Result("a.jpg", "pose", "ok", answer="dup"), "x", "v1")
    assert not journal.record(Result("a.jpg", "pose", "ok", answer="stray"), "x", None)
    assert journal.final_inputs() == {("a.jpg", "pose"): "v1"}
    assert journal.record(Result("a.jpg", "pose", "ok", answer="new", prompt_tokens=12), "x", "v2")
    (row,) = journal.rows()
    assert (row["answer"], row["inputs"], row["prompt_tokens"]) == ("new", "v2", 22)
    assert journal.record(Result("a.jpg", "pose", "failed", error="503"), "x", "v3")
    assert journal.final_inputs() == {}  # the v2 answer is not an answer for v3


def test_a_journal_from_before_the_fingerprint_is_upgraded_in_place(tmp_path):
  path = str(tmp_path / "j.sqlite")
  db = sqlite3.connect(path)
  db.execute("CREATE TABLE results (image_id TEXT NOT NULL, attribute TEXT NOT NULL, status TEXT"
             " NOT NULL, answer TEXT, source TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,"
             " completion_tokens INTEGER NOT NULL, attempts INTEGER NOT NULL, error TEXT, updated"
             " REAL NOT NULL, PRIMARY KEY (image_id, attribute))")
  db.execute("INSERT INTO results VALUES ('a.jpg', 'pose', 'ok', 'old', 'openai', 5, 2, 1, NULL,"
             " 0)")
  db.commit()
  db.close()
  with Journal(path) as journal:
    assert journal.final_inputs() == {("a.jpg", "pose"): None}  # unknown: not trusted
    assert journal.record(Result("a.jpg", "pose", "ok", answer="new"), "openai", "v1")
    assert journal.rows()[0]["prompt_tokens"] == 5


def test_malformed_results_are_rejected(tmp_path):
  with Journal(str(tmp_path / "j.sqlite")) as journal:
    with pytest.raises(ValueError, match="no answer"):
      journal.record(Result("a.jpg", "pose", "ok", answer=""), "x")
    with pytest.raises(ValueError, match="unknown result status"):
      journal.record(Result("a.jpg", "pose", "done", answer="x"), "x")


def test_meta_store_persists_across_reopen(tmp_path):
  path = str(tmp_path / "j.sqlite")
  with Journal(path) as journal:
    assert journal.get("batch_id") is None
    journal.set("batch_id", "batch_1")
    journal.set("batch_id", "batch_2")
  with Journal(path) as journal:
    assert journal.get("batch_id") == "batch_2"


def test_every_recorded_result_survives_sigkill(tmp_path):
  path = str(tmp_path / "j.sqlite")
  script = (
      "import os, signal, sys\n"
      "from data_gen.backends.base import Result\n"
      "from data_gen.journal import Journal\n"
      "j = Journal(sys.argv[1])\n"
      "for i in range(200):\n"
      "  j.record(Result(f'{i}.jpg', 'pose', 'ok', answer=f'answer {i}'), 'offline')\n"
      "os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True)
  assert proc.returncode == -signal.SIGKILL
  with Journal(path) as journal:
    rows = journal.rows("ok")
  assert len(rows) == 200
  assert {r["answer"] for r in rows} == {f"answer {i}" for i in range(200)}
