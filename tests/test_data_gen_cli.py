"""The data_gen commands' shared failure modes: outputs checked before anything is written,
bad values and damaged inputs reported in one line, permissions tested as an unprivileged user."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_gen import cards, generate, inspect as inspect_cmd, mcq, sharegpt, synth
import unprivileged

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Six synthetic faces (32 px) with the synthetic world's labels."""
  root = tmp_path_factory.mktemp("world")
  synth.write_dataset(root, 6, seed=3, size=32)
  return root


def _labels(world):
  return ["--labels", str(world / "labels.csv"), "--images", str(world)]


def _one_error_line(capsys, prefix="error: "):
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and prefix in lines[0], err
  return lines[0]


COMMANDS = {
    "synth": lambda world, out: synth.main(["--out", str(out), "--num", "2", "--seed", "0"]),
    "mcq": lambda world, out: mcq.main([*_labels(world), "--out", str(out), "--no-progress"]),
    "cards": lambda world, out: cards.main([*_labels(world), "--out", str(out), "--no-progress"]),
    "generate": lambda world, out: generate.main([*_labels(world), "--out", str(out),
                                                  "--no-progress", "--attributes", "pose"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_non_empty_output_folder_is_refused_untouched(world, tmp_path, capsys, command):
  out = tmp_path / "out"
  out.mkdir()
  (out / "labels.csv").write_text("a user's own file\n")
  assert COMMANDS[command](world, out) == 2
  assert "non-empty directory" in _one_error_line(capsys)
  assert os.listdir(out) == ["labels.csv"]
  assert (out / "labels.csv").read_text() == "a user's own file\n"


@pytest.mark.parametrize("command", ["synth", "mcq", "cards"])
def test_commands_that_cannot_resume_refuse_a_previous_data_gen_output(world, tmp_path, capsys,
                                                                       command):
  out = tmp_path / "out"
  assert COMMANDS["generate"](world, out) == 0
  capsys.readouterr()
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert COMMANDS[command](world, out) == 2
  assert "non-empty directory" in _one_error_line(capsys)
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_output_that_is_a_file_is_refused(world, tmp_path, capsys, command):
  out = tmp_path / "out"
  out.write_text("not a folder")
  assert COMMANDS[command](world, out) == 2
  assert "is not a directory" in _one_error_line(capsys)
  assert out.read_text() == "not a folder"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_empty_output_folder_is_used(world, tmp_path, capsys, command):
  out = tmp_path / "out"
  out.mkdir()
  assert COMMANDS[command](world, out) == 0
  assert os.listdir(out)


def test_generate_still_resumes_its_own_output(world, tmp_path):
  out = tmp_path / "out"
  assert COMMANDS["generate"](world, out) == 0
  assert COMMANDS["generate"](world, out) == 0
  assert json.loads((out / "report.json").read_text())["already_done"] == 6


def test_synth_refuses_a_non_empty_benchmark_folder(tmp_path, capsys):
  (tmp_path / "bench").mkdir()
  (tmp_path / "bench" / "notes.txt").write_text("mine")
  assert synth.main(["--out", str(tmp_path / "ds"), "--num", "2", "--seed", "0",
                     "--benchmark-out", str(tmp_path / "bench")]) == 2
  assert "--benchmark-out" in _one_error_line(capsys, "synth: error:")
  assert not (tmp_path / "ds").exists()
