"""The data_gen commands' shared failure modes: outputs checked before anything is written,
bad values and damaged inputs reported in one line, permissions tested as an unprivileged user."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from data_gen import cards, generate, inspect as inspect_cmd, mcq, raw, sharegpt, synth
import unprivileged

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Six synthetic faces (32 px) with the synthetic world's labels."""
  root = tmp_path_factory.mktemp("world")
  synth.write_dataset(root, 6, seed=3, size=32)
  question = "Describe this image."  # the reference's question 7
  (root / "dataset.json").write_text(json.dumps([{"image": "train/1.jpg", "conversations": [
      {"from": "human", "value": "<image>" + question}, {"from": "gpt", "value": "A face."}]}]))
  (root / "raw" / "train" / "1").mkdir(parents=True)
  (root / "raw" / "train" / "1" / "question_7.txt").write_text(question)
  (root / "raw" / "train" / "1" / "answer_7.txt").write_text("A face.")
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
    "import-sharegpt": lambda world, out: sharegpt.main([str(world / "dataset.json"), "--images",
                                                         str(world), "--out", str(out),
                                                         "--no-progress"]),
    "import-raw": lambda world, out: raw.main([str(world / "raw"), *_labels(world), "--out",
                                               str(out), "--no-progress"]),
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


@pytest.mark.parametrize("command", ["synth", "mcq", "cards", "import-sharegpt", "import-raw"])
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


def _unprivileged_generate(world, out, home):
  unprivileged.open_up(world)
  return unprivileged.python_unprivileged(
      ["data_gen", "generate", *_labels(world), "--out", str(out), "--no-progress",
       "--attributes", "pose"], home=home, cwd=ROOT, timeout=120)


def test_generate_into_a_folder_it_may_not_write_says_so_before_anything(world, tmp_path):
  out = tmp_path / "readonly"
  out.mkdir(mode=0o755)  # owned by whoever runs the suite; the command runs as another user
  os.chmod(out, 0o555)
  proc = _unprivileged_generate(world, out, tmp_path / "home")
  assert proc.returncode == 2, proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert "is not writable by this user" in line and "journaled" not in line
  assert os.listdir(out) == []


def test_generate_with_a_journal_it_may_not_write_says_what_failed_and_that_nothing_was_kept(
    world, tmp_path):
  out = tmp_path / "out"
  assert COMMANDS["generate"](world, out) == 0  # a finished output owned by us ...
  unprivileged.open_up(out)
  unprivileged.give_away(out)  # ... whose folder the other user may write, but not its journal
  journal = out / ".journal"
  for path in (journal, *journal.iterdir()):
    os.chown(path, os.getuid(), os.getgid())
    os.chmod(path, 0o755 if path.is_dir() else 0o644)
  proc = _unprivileged_generate(world, out, tmp_path / "home")
  assert proc.returncode == 1, proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"error: while opening the journal in {out}: PermissionError"), line
  assert line.endswith("nothing of this run was journaled") and "resume" not in line


@pytest.fixture
def odd_labels(world, tmp_path):
  """The world's CSV with four rows whose label values the synthetic world does not know."""
  lines = (world / "labels.csv").read_text().splitlines()
  header = lines[0].split(",")
  edits = {2: ("head_pose", "up"), 3: ("facial_hair", "goatee"), 4: ("eyeglasses", "maybe"),
           5: ("expression", "confused")}
  for line, (column, value) in edits.items():
    row = lines[line - 1].split(",")
    row[header.index(column)] = value
    lines[line - 1] = ",".join(row)
  path = tmp_path / "labels.csv"
  path.write_text("\n".join(lines) + "\n")
  return path, edits


@pytest.mark.parametrize("command", ["mcq", "cards"])
def test_rows_with_unknown_label_values_are_skipped_and_named(world, tmp_path, capsys, odd_labels,
                                                              command):
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top

  path, edits = odd_labels
  out = tmp_path / "out"
  main = {"mcq": mcq.main, "cards": cards.main}[command]
  assert main(["--labels", str(path), "--images", str(world), "--out", str(out),
               "--no-progress"]) == 0
  skipped = [l for l in capsys.readouterr().err.splitlines() if l.startswith("skipped")]
  assert len(skipped) == len(edits)
  for text, (line, (column, value)) in zip(skipped, sorted(edits.items())):
    assert f"line {line} " in text and f"{column}='{value}'" in text, text
  source = pipeline.open_tfds_source(out)
  kept = {pipeline._text(source[i]["image_id"]) for i in range(len(source))}
  assert kept == {"train/5.jpg", "train/6.jpg"}  # CSV lines 6 and 7


def test_every_mcq_about_a_known_face_has_exactly_four_options():
  base = synth.sample_labels(1, seed=0)[0]
  for column in ("age", "gender", "race", "expression", "head_pose", "eyeglasses", "facial_hair",
                 "sharpness", "jpeg_quality"):
    for value in synth.VOCAB[column]:
      labels = {**base, column: value}
      for task in mcq.TASKS:
        for item in mcq.face_mcqs("x", labels, seed=1, tasks=[task], rounds=3):
          options = item.question.options
          assert len(options) == len(set(options)) == 4, (column, value, task, options)
          assert item.question.answer in options


@pytest.fixture(scope="module")
def dataset(world, tmp_path_factory):
  out = tmp_path_factory.mktemp("dataset") / "out"
  assert COMMANDS["generate"](world, out) == 0
  return out


def test_inspect_samples_counts_from_zero(dataset, capsys):
  capsys.readouterr()
  assert inspect_cmd.main([str(dataset), "--samples", "-1"]) == 2
  assert "--samples must be >= 0, got -1" in _one_error_line(capsys)
  assert inspect_cmd.summarize(str(dataset), samples=0)["splits"]["train"]["samples"] == []
  assert len(inspect_cmd.summarize(str(dataset), samples=6)["splits"]["train"]["samples"]) == 6


def _damage(dataset, tmp_path, how):
  copy = tmp_path / "damaged"
  shutil.copytree(dataset, copy)
  if how == "dataset_info.json":
    (copy / "dataset_info.json").write_text('{"name": ')
  else:
    (shard,) = copy.glob("data-*/*.array_record-*")
    with open(shard, "r+b") as f:
      f.truncate(how)
  return copy


@pytest.mark.parametrize("how, message", [
    ("dataset_info.json", "dataset_info.json or features.json cannot be read: ParseError"),
    (100, "train split cannot be read (shards data-"),
    (0, "train split cannot be read (shards data-"),
])
def test_inspect_of_a_damaged_dataset_is_one_line_and_generate_rebuilds_it(
    world, dataset, tmp_path, capsys, how, message):
  damaged = _damage(dataset, tmp_path, how)
  capsys.readouterr()
  assert inspect_cmd.main([str(damaged)]) == 2
  line = _one_error_line(capsys)
  assert message in line and "damaged or incomplete" in line, line
  assert COMMANDS["generate"](world, damaged) == 0  # the journal still has every answer
  assert inspect_cmd.summarize(str(damaged))["report"]["requested"] == 0
  assert inspect_cmd.summarize(str(damaged))["splits"]["train"]["records"] == 6


def test_inspect_piped_into_a_reader_that_stops_early_is_not_a_traceback(dataset):
  # `true` exits before inspect has started, so inspect writes into a closed pipe.
  proc = subprocess.run(f"{sys.executable} -m data_gen inspect {dataset} | true", shell=True,
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.stderr == ""


def test_mcq_with_a_damaged_qa_dataset_is_one_line_and_writes_nothing(world, dataset, tmp_path,
                                                                      capsys):
  damaged = _damage(dataset, tmp_path, 100)
  out = tmp_path / "out"
  assert mcq.main([*_labels(world), "--out", str(out), "--qa", str(damaged), "--no-progress"]) == 2
  assert "train split cannot be read" in _one_error_line(capsys, "mcq: error:")
  assert not out.exists()


def test_synth_checks_every_output_before_it_writes_one(tmp_path):
  home = tmp_path / "home"
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o555)
  proc = unprivileged.python_unprivileged(
      ["data_gen", "synth", "--out", str(home / "faces"), "--num", "2", "--seed", "0",
       "--preview", str(locked / "preview.png")], home=home, cwd=ROOT, timeout=120)
  assert proc.returncode == 2, proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("synth: error: --preview") and "not writable by this user" in line
  assert not (home / "faces").exists()


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(world, tmp_path, capsys):
  import fcntl  # pylint: disable=g-import-not-at-top

  out = tmp_path / "out"
  assert COMMANDS["generate"](world, out) == 0
  capsys.readouterr()
  with open(out / ".journal" / "lock", "rb") as held:  # what a running generate holds
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert COMMANDS["generate"](world, out) == 2
  assert "another run is already writing to" in _one_error_line(capsys)
  assert COMMANDS["generate"](world, out) == 0  # released: the next run goes ahead


def test_mcq_text_letter_items_and_letter_lookups_name_an_option_then_its_printed_letter(world, tmp_path, capsys):
  from facellm_jax.evaluation import facexbench  # pylint: disable=g-import-not-at-top
  from facellm_jax.input import pipeline  # pylint: disable=g-import-not-at-top  (imports TFDS)

  out = tmp_path / "out"
  argv = [*_labels(world), "--out", str(out), "--answer", "text_letter", "--pointers", "--no-progress"]
  assert mcq.main(argv) == 0
  assert "0 cards and 6 letter lookups" in capsys.readouterr().err
  source = pipeline.open_tfds_source(out)
  lookups = []
  for i in range(len(source)):
    attribute, prompt, target = (pipeline._text(source[i][k]) for k in ("attribute", "question", "answer"))
    options = [line[4:] for line in prompt.splitlines() if line[:1] == "(" and line[2:4] == ") "]
    # " Female(B)": the text, then the letter as the prompt prints it ("(B" is one of its tokens).
    text, letter = target[:-3], target[-3:]
    assert letter[0] + letter[2] == "()" and options["ABCD".index(letter[1])] == text.removeprefix(" ")
    assert facexbench.extract_answer(target, options) == letter[1]
    assert facexbench.extract_answer(target, ["w", "x", "y", "z"]) == letter[1]  # by the letter alone
    if attribute == mcq.POINTER_ATTRIBUTE:
      assert prompt == facexbench.option_lines(options)  # the list alone: no question to answer
      lookups.append(letter[1])
  assert len(source) == 7 * len(lookups) + len(lookups) and len(set(lookups)) > 1
  capsys.readouterr()
  assert mcq.main([*_labels(world), "--out", str(tmp_path / "o2"), "--answer", "letter"]) == 2
  assert "--answer" in _one_error_line(capsys)
