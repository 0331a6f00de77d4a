"""The synthetic face world: determinism, balance, factor locality, formats, CLI, learnability."""

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_gen import synth
from data_gen.synth_render import AGE_BINS

SIZE = 112
BENCH_NUM = 12
BASE = dict(age="30-39", gender="Male", race="White", service_test="True", expression="neutral",
            head_pose="frontal", roll=0, eyes="open", eyeglasses="no", facial_hair="none",
            hair_length="short", hair_color="blond", lighting="even", brightness="normal",
            sharpness="sharp", jpeg_quality="high", background="blue")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """One `python -m data_gen synth` run (in-process) shared by the format tests."""
  root = tmp_path_factory.mktemp("synth")
  argv = ["--out", str(root / "ds"), "--num", "40", "--seed", "7",
          "--benchmark-out", str(root / "bench"), "--benchmark-num", str(BENCH_NUM),
          "--preview", str(root / "preview.png")]
  assert synth.main(argv) == 0
  return root


def _read_csv(path):
  with open(path, newline="", encoding="utf-8") as fh:
    reader = csv.DictReader(fh)
    return reader.fieldnames, list(reader)


def _tree_bytes(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_same_bytes_and_another_seed_other_faces(tmp_path):
  for name in ("a", "b"):
    synth.write_dataset(tmp_path / name, 10, seed=5)
    synth.write_benchmark(tmp_path / f"bench_{name}", 2, seed=5)
  synth.write_dataset(tmp_path / "c", 10, seed=6)
  a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
  assert a == b and len(a) == 11  # 10 JPEGs + labels.csv
  assert _tree_bytes(tmp_path / "bench_a") == _tree_bytes(tmp_path / "bench_b")
  for i in range(1, 11):
    assert a[f"train/{i}.jpg"] != c[f"train/{i}.jpg"]


# ----------------------------------------------------------------------------- labels
def test_every_factor_is_balanced_within_ten_percent_of_uniform():
  rows = synth.sample_labels(2700, seed=3)
  columns = [c for c in synth.CSV_COLUMNS if c not in ("file", "facial_hair", "hair_color")]

  def check(name, values, vocab):
    counts = {v: values.count(v) for v in vocab}
    expected = len(values) / len(vocab)
    assert all(abs(n - expected) <= 0.1 * expected for n in counts.values()), (name, counts)

  for col in columns:
    vocab = (list(range(synth.ROLL_RANGE[0], synth.ROLL_RANGE[1] + 1)) if col == "roll"
             else synth.VOCAB[col])
    check(col, [r[col] for r in rows], vocab)
  # Dependent factors: balanced over the faces they can vary on, fixed elsewhere.
  can_beard = [r for r in rows if r["gender"] == "Male" and AGE_BINS.index(r["age"]) >= 3]
  check("facial_hair", [r["facial_hair"] for r in can_beard], synth.VOCAB["facial_hair"])
  assert all(r["facial_hair"] == "none" for r in rows if r not in can_beard)
  young = [r for r in rows if AGE_BINS.index(r["age"]) < AGE_BINS.index("60-69")]
  check("hair_color", [r["hair_color"] for r in young], ["black", "brown", "blond", "red"])
  assert all((r["hair_color"] == "grey") == (r not in young) for r in rows)


def test_labels_csv_has_fairface_columns_first_and_known_values(cli_run):
  header, rows = _read_csv(cli_run / "ds" / "labels.csv")
  assert header == ["file", "age", "gender", "race", "service_test", "expression", "head_pose",
                    "roll", "eyes", "eyeglasses", "facial_hair", "hair_length", "hair_color",
                    "lighting", "brightness", "sharpness", "jpeg_quality", "background"]
  assert [r["file"] for r in rows] == [f"train/{i}.jpg" for i in range(1, 41)]
  for row in rows:
    for col, vocab in synth.VOCAB.items():
      assert row[col] in vocab, (col, row[col])
    assert synth.ROLL_RANGE[0] <= int(row["roll"]) <= synth.ROLL_RANGE[1]
    with Image.open(cli_run / "ds" / row["file"]) as img:
      assert (img.format, img.size, img.mode) == ("JPEG", (SIZE, SIZE), "RGB")


# ----------------------------------------------------------------------------- locality
def _render(seed=0, **changes):
  return np.asarray(synth.render_face({**BASE, **changes}, SIZE, np.random.default_rng(seed)),
                    dtype=np.int16)


def _changed(a, b):
  return np.abs(a - b).max(-1) > 30


def _fraction_inside(mask, box):
  x0, y0, x1, y1 = (int(v * SIZE) for v in box)
  return mask[y0:y1, x0:x1].sum() / max(mask.sum(), 1)


@pytest.mark.parametrize("factor,base,others,box", [
    ("expression", "neutral", ("happy", "sad", "surprised", "angry"), (0.25, 0.5, 0.75, 0.8)),
    ("eyes", "open", ("closed",), (0.2, 0.3, 0.8, 0.55)),
    ("eyeglasses", "no", ("yes",), (0.12, 0.28, 0.88, 0.55)),
    ("facial_hair", "none", ("beard", "moustache"), (0.15, 0.45, 0.85, 0.95)),
    ("age", "20-29", ("30-39", "40-49"), (0.2, 0.15, 0.8, 0.75)),
])
def test_factor_changes_only_its_own_region(factor, base, others, box):
  for seed in range(4):
    ref = _render(seed, **{factor: base})
    for value in others:
      mask = _changed(ref, _render(seed, **{factor: value}))
      assert mask.sum() > 20, (factor, value, "no visible change")
      assert _fraction_inside(mask, box) >= 0.98, (factor, value, seed)


def test_background_and_hair_leave_the_inner_face_untouched():
  ref = _render()
  background = _changed(ref, _render(background="yellow"))
  assert background.mean() > 0.4 and _fraction_inside(background, (0.35, 0.3, 0.65, 0.7)) == 0
  hair = _changed(ref, _render(hair_color="red"))
  assert hair.sum() > 200 and _fraction_inside(hair, (0.3, 0.5, 0.7, 0.85)) == 0


def test_head_pose_slides_the_features_towards_the_turn():
  def dark_centroid_x(img):
    luma = img[..., :3].mean(-1)
    y0, y1 = int(0.35 * SIZE), int(0.75 * SIZE)
    ys, xs = np.nonzero(luma[y0:y1] < 70)
    return xs.mean()

  for seed in range(3):
    kw = dict(seed=seed, expression="surprised")
    left, front, right = (dark_centroid_x(_render(head_pose=p, **kw))
                          for p in ("left", "frontal", "right"))
    assert left < front - 3 and front < right - 3, (left, front, right)


def test_lighting_brightness_blur_and_jpeg_have_their_signatures():
  def luma(img):
    return np.asarray(img, np.float32)[..., :3].mean(-1)

  third = SIZE // 3
  for light, sign in (("left", 1), ("right", -1), ("even", 0)):
    y = luma(_render(lighting=light))
    ratio = y[:, :third].mean() / y[:, -third:].mean()
    assert (ratio > 1.25) if sign > 0 else (ratio < 0.8) if sign < 0 else (0.9 < ratio < 1.1)
  means = [luma(_render(brightness=b)).mean() for b in ("dim", "normal", "bright")]
  assert means[0] < 0.85 * means[1] and means[2] > 1.1 * means[1]
  grad = [np.percentile(np.abs(np.diff(luma(_render(sharpness=s)), axis=1)), 99.5)
          for s in ("sharp", "blurry")]
  assert grad[1] < 0.6 * grad[0]

  def decoded_lap(quality):
    data = synth.render_jpeg({**BASE, "jpeg_quality": quality}, SIZE, np.random.default_rng(0))
    y = luma(Image.open(io.BytesIO(data)))
    return np.median(np.abs(4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2]
                            - y[1:-1, 2:]))

  assert decoded_lap("low") < 0.5 * decoded_lap("high")


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_files_mirror_facexbench_and_have_one_correct_option(cli_run):
  bench = cli_run / "bench"
  files = sorted(bench.glob("*.json"))
  expected = {"age": ("bias_fairness", "age"), "gender": ("bias_fairness", "gender"),
              "race": ("bias_fairness", "race"),
              "expression": ("attributes_expression", "expression"),
              "attributes": ("attributes_expression", "attributes"),
              "headpose": ("face_localization", "headpose"),
              "image_quality": ("image_quality", "image_quality")}
  assert [f.name for f in files] == sorted(f"synthetic_single_mcq_{t}.json" for t in expected)
  for path in files:
    doc = json.loads(path.read_text())
    task = path.stem.removeprefix("synthetic_single_mcq_")
    assert list(doc) == ["category", "sub-category", "dataset", "question_type", "num_images",
                         "prepend_text", "postpend_text", "questions"]
    assert (doc["category"], doc["sub-category"]) == expected[task]
    assert (doc["dataset"], doc["question_type"], doc["num_images"]) == ("synthetic", "MCQ",
                                                                          "single")
    assert doc["postpend_text"].startswith("Please answer the question and provide only")
    assert list(doc["questions"]) == [str(i) for i in range(1, BENCH_NUM + 1)]
    letters = set()
    for q in doc["questions"].values():
      assert list(q) == ["image_paths", "question_text", "options", "correct_answer_option",
                         "answer"]
      assert len(q["options"]) == 4 and len(set(q["options"])) == 4
      assert q["options"].count(q["answer"]) == 1
      assert q["options"]["ABCD".index(q["correct_answer_option"])] == q["answer"]
      assert len(q["image_paths"]) == 1 and (bench / q["image_paths"][0]).is_file()
      letters.add(q["correct_answer_option"])
    assert len(letters) >= 2, f"{path.name}: options are not shuffled"


def test_benchmark_answers_come_from_the_label_vocabularies(cli_run):
  allowed = {"age": set(AGE_BINS), "gender": {"Male", "Female"}, "race": set(synth.VOCAB["race"]),
             "expression": set(synth.VOCAB["expression"]),
             "headpose": set(synth.VOCAB["head_pose"]),
             "attributes": {"Yes", "No", "Beard", "Moustache", "No facial hair"},
             "image_quality": {"sharp", "blurry", "high", "low"}}
  for path in sorted((cli_run / "bench").glob("*.json")):
    task = path.stem.removeprefix("synthetic_single_mcq_")
    answers = [q["answer"] for q in json.loads(path.read_text())["questions"].values()]
    assert set(answers) <= allowed[task], (task, answers)
    assert max(answers.count(a) for a in answers) < len(answers), f"{task}: one answer only"


def test_benchmark_faces_are_held_out_from_the_dataset(cli_run):
  digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
  train = {digest(p) for p in (cli_run / "ds" / "train").glob("*.jpg")}
  bench = {digest(p) for p in (cli_run / "bench" / "images").rglob("*.jpg")}
  assert len(bench) == 7 * BENCH_NUM and not train & bench


def test_benchmark_loads_with_the_facexbench_evaluation_code(cli_run):
  from facellm_jax.evaluation import facexbench
  questions = facexbench.load_benchmark(cli_run / "bench")
  assert len(questions) == 7 * BENCH_NUM
  assert {q.task for q in questions} == {"age", "gender", "race", "expression", "attributes",
                                         "headpose", "image_quality"}
  assert all(q.options[facexbench.LETTERS.index(q.correct)] == q.answer for q in questions)


# ----------------------------------------------------------------------------- CLI, preview
def test_preview_is_a_small_captioned_contact_sheet(cli_run):
  with Image.open(cli_run / "preview.png") as img:
    assert img.format == "PNG" and img.width > 8 * SIZE and img.height > 4 * SIZE
  assert (cli_run / "preview.png").stat().st_size < 300_000


@pytest.mark.parametrize("argv", [
    ["--out", "{tmp}/x", "--num", "0", "--seed", "1"],
    ["--out", "{tmp}/x", "--num", "many", "--seed", "1"],
    ["--out", "{tmp}/x", "--num", "3"],
    ["--out", "{tmp}/x", "--num", "3", "--seed", "-1"],
    ["--out", "{tmp}/x", "--num", "3", "--seed", "1", "--size", "8"],
    ["--out", "{tmp}/x", "--num", "3", "--seed", "1", "--benchmark-num", "5"],
    ["--out", "{tmp}/file.txt", "--num", "3", "--seed", "1"],
    ["--out", "{tmp}/x", "--num", "3", "--seed", "1", "--preview", "{tmp}/p.jpg"],
    ["--out", "{tmp}/x", "--num", "3", "--seed", "1", "--benchmark-out", "{tmp}/x"],
])
def test_bad_input_prints_one_line_and_exits_nonzero(argv, tmp_path, capsys):
  (tmp_path / "file.txt").write_text("not a folder")
  rc = synth.main([a.format(tmp=tmp_path) for a in argv])
  err = capsys.readouterr().err
  assert rc != 0 and len(err.strip().splitlines()) == 1 and err.startswith("synth: error:")
  assert not (tmp_path / "x").exists()


def test_module_entry_point_reports_bad_input_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "data_gen", "synth", "--out", str(tmp_path),
                         "--num", "-4", "--seed", "0"], capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
      "synth: error: --num must be at least 1, got -4"]


# ----------------------------------------------------------------------------- learnability
PROBED = ("age", "gender", "race", "expression", "head_pose", "eyeglasses", "facial_hair",
          "sharpness", "jpeg_quality")


def _probe_data(n, stream):
  rows = synth.sample_labels(n, 11, stream)
  x = np.stack([np.asarray(Image.open(io.BytesIO(
      synth.render_jpeg(r, SIZE, synth.face_rng(11, stream, i))))) for i, r in enumerate(rows)])
  y = np.array([[synth.VOCAB[f].index(r[f]) for f in PROBED] for r in rows])
  return _probe_inputs(x), y


def _probe_inputs(x):
  """ViT-style 14 px patches of the pixels, plus the patches of a fixed 3x3 high-pass band."""
  n = len(x)
  xf = x.astype(np.float32)
  pix = (xf / 127.5 - 1.0).reshape(n, 8, 14, 8, 14, 3).transpose(0, 1, 3, 2, 4, 5)
  gray = xf.mean(-1)
  pad = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
  local_mean = sum(pad[:, i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9
  hp = ((gray - local_mean) / 8.0).reshape(n, 8, 14, 8, 14).transpose(0, 1, 3, 2, 4)
  return pix.reshape(n, 64, 588), hp.reshape(n, 64, 196)


def test_a_small_probe_reads_every_benchmarked_factor_from_held_out_faces():
  """Learnability: >= 90% held-out accuracy per benchmarked factor for a tiny model.

  The probe is a one-layer patch embedding (like a ViT's, 14 px patches, position-specific
  linear read-out) plus a pooled branch over a fixed high-pass band (the cheapest way for a
  tiny model to see blur and JPEG grain), trained jointly on all factors for 20 epochs.
  """
  import jax
  import jax.numpy as jnp
  import optax

  (tr_pix, tr_hp), tr_y = _probe_data(4000, "probe/train")
  (te_pix, te_hp), te_y = _probe_data(1000, "probe/test")
  sizes = [len(synth.VOCAB[f]) for f in PROBED]
  bounds = np.cumsum([0] + sizes)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {
      "patch": jax.random.normal(k[0], (588, 64)) / np.sqrt(588), "patch_b": jnp.zeros(64),
      "hp": jax.random.normal(k[1], (196, 16)) / np.sqrt(196), "hp_b": jnp.zeros(16),
      "head": jax.random.normal(k[2], (64 * 64 + 32, bounds[-1])) / 64.0,
      "head_b": jnp.zeros(bounds[-1]),
  }

  def logits(p, pix, hp):
    h = jax.nn.relu(pix @ p["patch"] + p["patch_b"]).reshape(pix.shape[0], -1)
    q = jax.nn.relu(hp @ p["hp"] + p["hp_b"])
    return jnp.concatenate([h, q.mean(1), q.max(1)], -1) @ p["head"] + p["head_b"]

  def loss(p, pix, hp, y):
    out = logits(p, pix, hp)
    return sum(optax.softmax_cross_entropy_with_integer_labels(out[:, a:b], y[:, j]).mean()
               for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))

  epochs, batch = 20, 128
  steps = len(tr_y) // batch
  opt = optax.adamw(optax.cosine_decay_schedule(2e-3, epochs * steps), weight_decay=1e-4)
  state = opt.init(params)

  @jax.jit
  def step(p, s, pix, hp, y):
    grads = jax.grad(loss)(p, pix, hp, y)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  order_rng = np.random.default_rng(0)
  for _ in range(epochs):
    order = order_rng.permutation(len(tr_y))
    for i in range(steps):
      idx = order[i * batch:(i + 1) * batch]
      params, state = step(params, state, tr_pix[idx], tr_hp[idx], tr_y[idx])
  out = np.asarray(jax.jit(logits)(params, te_pix, te_hp))
  acc = {f: float(np.mean(out[:, a:b].argmax(1) == te_y[:, j]))
         for j, (f, a, b) in enumerate(zip(PROBED, bounds[:-1], bounds[1:]))}
  print("probe accuracy:", {f: round(v, 3) for f, v in acc.items()})
  assert all(v >= 0.9 for v in acc.values()), acc
