"""`train --compile_only`: the real train step compiled for an abstract TPU topology (libtpu, no TPU)."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from facellm_jax import train
from facellm_jax.input import pipeline
from facellm_jax.input import tokenizer as tok_lib
from facellm_jax.training import compile_only, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402  pylint: disable=wrong-import-position

# configs/tiny.py shrunk further so that each TPU compile takes seconds on the CI box.
SMALL = ["--config.model.text.num_hidden_layers=1", "--config.model.vision.num_hidden_layers=1",
         "--config.data.cutoff_len=128"]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is in the test extra: pip install -e '.[test]'")


def _cli(capsys, workdir, *extra):
  code = train.main(["train", f"--config={ROOT / 'configs/tiny.py'}", f"--workdir={workdir}", "--compile_only",
                     *extra])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("packing, slots", [(False, 0), (False, 3), (True, 0), (True, 3)])
def test_abstract_batch_has_the_shapes_of_the_loops_batches(packing, slots, tmp_path):
  """What is compiled for a TPU is the step the loop runs: the same batch shapes, image slots included
  (the pipeline's default slots, and `max_images_per_row` with and without packing)."""
  cfg = tiny.get_config().unlock()
  cfg.data.update(packing=packing, max_images_per_row=slots, cutoff_len=96)
  mc = loop.model_config(cfg)
  tok = tok_lib.train_tokenizer(["What is the age?", "Aged 20-29."] * 5, 300, tmp_path)
  records = [{"image": np.full((20, 20, 3), 9 * i, np.uint8), "image_id": f"i{i}", "question": "What is the age?",
              "answer": "Aged 20-29.", "attribute": "age", "source": "synth"} for i in range(8)]
  batch = next(iter(pipeline.make_dataset(
      records, tok, image_size=mc.vision.image_size, num_image_tokens=mc.image_seq_length,
      seq_len=cfg.data.cutoff_len, batch_size=2, packing=packing,
      max_images_per_row=cfg.data.max_images_per_row, process_index=0, process_count=1, read_threads=1)))
  fed = {**batch, "pixel_values": loop._images_per_row(batch)}  # pylint: disable=protected-access  (the step's input)
  abstract = compile_only.abstract_batch(cfg, rows=2)
  assert {k: (v.shape[1:], v.dtype) for k, v in abstract.items()} == {k: (fed[k].shape, fed[k].dtype) for k in abstract}


@pytest.mark.parametrize("name, grid", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-32", "v5p:2x2x4"), ("v5p-64", "v5p:2x4x4"),
    ("v5p-128", "v5p:4x4x4"), ("v5litepod-16", "v5e:4x4"), ("v5e-8", "v5e:2x4"), ("v5litepod-1", "v5e:1x1"),
    ("v6e-8", "v6e:2x4"), ("v6e-256", "v6e:16x16"), ("v5p:2x2x1", "v5p:2x2x1"), ("v5litepod:2x2", "v5e:2x2")])
def test_slice_names_map_to_cloud_tpu_chip_grids(name, grid):
  assert compile_only.topology_name(name) == grid


@pytest.mark.parametrize("name", ["v5p-7", "v5p-12", "v4-8", "v5e:2x2x1", "tpu", "v6e-2"])
def test_unknown_slices_are_refused(name):
  with pytest.raises(compile_only.TopologyError, match="--topology"):
    compile_only.topology_name(name)


def _fake_compile(seen, *, fixed, per_row, hbm):
  def compile_rows(rows):
    seen.append(rows)
    total = fixed + per_row * rows + (rows > 20) * 7  # a little non-linear past 20 rows
    return {"rows_per_chip": rows, "fits": total <= hbm, "bytes_per_chip": {"total": total}}
  return compile_rows


def test_find_max_batch_doubles_then_bisects():
  seen = []
  best, tries = compile_only.find_max_batch(_fake_compile(seen, fixed=10, per_row=9, hbm=110))
  assert best == 11 and seen == [1, 2, 4, 8, 16, 12, 10, 11] and [t["rows_per_chip"] for t in tries] == seen
  assert compile_only.find_max_batch(lambda r: {"fits": False})[0] == 0


def test_find_max_batch_extrapolates_the_bytes_to_the_hbm():
  seen = []
  assert compile_only.find_max_batch(_fake_compile(seen, fixed=10, per_row=9, hbm=110), hbm=110)[0] == 11
  assert seen == [1, 2, 11, 12]  # 10 + 9 * 11 = 109 fits, 12 does not
  seen.clear()
  assert compile_only.find_max_batch(_fake_compile(seen, fixed=0, per_row=4, hbm=100), hbm=100)[0] == 23
  assert seen == [1, 2, 25, 24, 22, 23]  # 25 misses the non-linearity: down 1, 2 rows, then bisection


def test_bad_topology_is_one_line_and_exit_2(capsys, tmp_path):
  code, out, err = _cli(capsys, tmp_path / "w", "--topology=v5p-7")
  assert code == 2 and out == "" and err.startswith("error: --topology='v5p-7'") and err.count("\n") == 1


def test_missing_libtpu_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  code, _, err = _cli(capsys, tmp_path / "w", "--topology=v5e-4")
  assert code == 2 and "pip install -e '.[tpu]'" in err and err.count("\n") == 1


@needs_libtpu
def test_json_bytes_are_xla_memory_analysis_and_nothing_is_written(capsys, tmp_path):
  code, out, _ = _cli(capsys, tmp_path / "w", "--topology=v5e:2x2", "--config.train.batch_size=8", *SMALL)
  assert code == 0
  report = json.loads(out.strip().splitlines()[-1])
  assert not (tmp_path / "w").exists()
  assert (report["chips"], report["device_kind"]) == (4, "TPU v5 lite")
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert (report["rows_per_chip"], report["seq_len"], report["fits"]) == (2, 128, True)

  # The same compile, here: its buffer assignment is what the JSON says.
  cfg = train._CONFIG.value  # pylint: disable=protected-access  (the config the CLI call parsed)
  lowered, _ = compile_only.lower_train_step(cfg, compile_only.topology_devices("v5e:2x2"), 2)
  m = lowered.compile().memory_analysis()
  b = report["bytes_per_chip"]
  assert (b["arguments"], b["temporaries"]) == (m.argument_size_in_bytes, m.temp_size_in_bytes)
  assert b["total"] == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                        + m.temp_size_in_bytes)
  assert 0 < b["total"] < report["hbm_per_chip"]
  # Donation: the new state reuses the old state's buffers; only the metrics (scalars) are new.
  assert b["aliased"] > 0.99 * b["outputs"] and b["outputs"] - b["aliased"] <= 8 * 1024
  assert report["xla_flops_per_chip"] > 0 and report["model_flops_per_chip"] > 0


@needs_libtpu
def test_fits_turns_false_when_the_batch_is_too_large(capsys, tmp_path):
  code, out, _ = _cli(capsys, tmp_path / "w", "--topology=v5e:2x2", "--config.train.batch_size=65536", *SMALL)
  assert code == 0
  report = json.loads(out.strip().splitlines()[-1])
  assert report["rows_per_chip"] == 16384 and report["fits"] is False
  assert "xla_message" in report or report["bytes_per_chip"]["total"] > report["hbm_per_chip"]


def test_topology_without_compile_only_is_a_flag_error(capsys, tmp_path):
  code = train.main(["train", f"--config={ROOT / 'configs/tiny.py'}", f"--workdir={tmp_path / 'w'}",
                     "--topology=v5p-8"])
  err = capsys.readouterr().err
  assert code == 2 and "only go with --compile_only" in err and not (tmp_path / "w").exists()


def test_compile_only_without_topology_is_one_line_and_exit_2(capsys, tmp_path):
  code, _, err = _cli(capsys, tmp_path / "w")
  assert code == 2 and "--compile_only needs --topology" in err and err.count("\n") == 1


@needs_libtpu
def test_scanned_layers_with_remat_compile_for_tpu(capsys, tmp_path):
  """The scanned, rematerialized step (the size configs' defaults) compiles for a TPU topology.

  (Whether it saves memory shows at real sizes only: benchmarks/README.md. At this size the
  stacked gradients and the loss blocks outweigh the activations remat drops.)
  """
  code, out, _ = _cli(capsys, tmp_path / "w", "--topology=v5e:2x2", "--config.train.batch_size=8",
                      "--config.train.scan_layers=True", "--config.train.remat=full", *SMALL)
  report = json.loads(out.strip().splitlines()[-1])
  assert code == 0 and report["fits"] and report["rows_per_chip"] == 2
  assert 0 < report["bytes_per_chip"]["temporaries"] < report["hbm_per_chip"]
