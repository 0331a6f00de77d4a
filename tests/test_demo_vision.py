"""The demo's vision pretraining: it teaches the tower to see, leaves the decoder alone, and its
checkpoint is what the card stage loads."""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo_pretrain
from data_gen import fairface, synth
from facellm_jax import demo_vision, hf
from facellm_jax.input import image as image_lib
from facellm_jax.models.facellm import FaceLLM
from facellm_jax.training import loop

SEED = 5
TRAIN = 320


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("vision_world")
  synth.write_dataset(root, TRAIN + 160, SEED, size=112)
  faces, bad = fairface.read_labels(str(root / "labels.csv"), str(root), progress=False)
  assert not bad
  return faces


@pytest.fixture(scope="module")
def mc():
  return loop.model_config(demo_pretrain.get_config())


@pytest.fixture(scope="module")
def trained(world, mc):
  pixels, labels = demo_vision.read_faces(world, mc.vision.image_size)
  model, metrics = demo_vision.train(mc, pixels[:TRAIN], labels[:TRAIN], steps=160, batch_size=32,
                                     learning_rate=1e-3, seed=SEED, show_progress=False)
  return model, metrics, pixels, labels


def _features(model, pixels):
  return np.asarray(model.encode_images(jnp.asarray(image_lib.normalize(pixels)))[:, 0])


def _probe_accuracy(model, pixels, labels, factor):
  """Held-out accuracy of a ridge read-out of the image token fitted on the training faces: whether
  the tower's features carry the factor for faces it never saw, without the dropped heads."""
  j = demo_vision.FACTORS.index(factor)
  feats = _features(model, pixels)
  feats = np.concatenate([feats, np.ones((len(feats), 1))], 1)
  train, test = feats[:TRAIN], feats[TRAIN:]
  onehot = np.eye(labels[:, j].max() + 1)[labels[:TRAIN, j]]
  w = np.linalg.solve(train.T @ train + 1e-2 * np.eye(train.shape[1]), train.T @ onehot)
  return float(np.mean((test @ w).argmax(1) == labels[TRAIN:, j]))


def test_the_tower_learns_to_see_the_factors_on_held_out_faces(trained, mc):
  model, _, pixels, labels = trained
  fresh = FaceLLM(mc, rngs=nnx.Rngs(SEED))
  gain = {f: _probe_accuracy(model, pixels, labels, f) - _probe_accuracy(fresh, pixels, labels, f)
          for f in demo_vision.FACTORS}
  print("held-out probe accuracy gained:", {f: round(g, 3) for f, g in gain.items()})
  assert np.mean(list(gain.values())) >= 0.1 and gain["head_pose"] >= 0.2, gain


def _params(model):
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def test_only_the_tower_and_projector_train(trained, mc):
  model, metrics, _, _ = trained
  fresh, now = _params(FaceLLM(mc, rngs=nnx.Rngs(SEED))), _params(model)
  assert fresh.keys() == now.keys()
  same = {k: np.array_equal(fresh[k], now[k]) for k in fresh}
  assert all(v for k, v in same.items() if "language" in k), "the decoder changed"
  assert not any(v for k, v in same.items() if "language" not in k), \
      [k for k, v in same.items() if v and "language" not in k]
  assert metrics["steps"] == 160 and set(metrics["train_accuracy"]) == set(demo_vision.FACTORS)


def test_run_writes_a_checkpoint_that_loads_and_a_rerun_trains_nothing(world, mc, tmp_path,
                                                                       monkeypatch):
  out = tmp_path / "vision"
  kw = dict(steps=3, batch_size=8, learning_rate=1e-3, seed=SEED)
  metrics = demo_vision.run(world[:40], out, mc, **kw)
  loaded, _ = hf.load_pretrained(out / "hf")
  pixels, _ = demo_vision.read_faces(world[:4], mc.vision.image_size)
  model, _ = demo_vision.train(mc, *demo_vision.read_faces(world[:40], mc.vision.image_size),
                               show_progress=False, **kw)
  np.testing.assert_allclose(_features(loaded, pixels), _features(model, pixels), rtol=1e-5,
                             atol=1e-6)
  monkeypatch.setattr(demo_vision, "train", lambda *a, **k: pytest.fail("trained again"))
  assert demo_vision.run(world[:40], out, mc, **kw) == metrics


def test_ctrl_c_stops_with_nothing_saved_and_the_rerun_starts_over(world, mc, tmp_path,
                                                                   monkeypatch):
  step = demo_vision._step  # pylint: disable=protected-access

  def interrupted(*args):
    signal.raise_signal(signal.SIGINT)  # caught by the stage: it stops after this step
    return step(*args)

  monkeypatch.setattr(demo_vision, "_step", interrupted)
  out = tmp_path / "vision"
  with pytest.raises(loop.Preempted) as stopped:
    demo_vision.run(world[:40], out, mc, steps=5, batch_size=8, learning_rate=1e-3, seed=SEED)
  assert stopped.value.signum == signal.SIGINT
  assert str(stopped.value) == ("stopped by SIGINT after step 1; nothing saved (a short stage), "
                                "rerun the same command to start it again")
  assert not (out / "hf").exists() and not (out / demo_vision.METRICS_FILE).exists()
  monkeypatch.setattr(demo_vision, "_step", step)
  assert demo_vision.run(world[:40], out, mc, steps=5, batch_size=8, learning_rate=1e-3,
                         seed=SEED)["steps"] == 5


def test_faces_without_the_synthetic_labels_are_refused_in_one_sentence(world):
  face = world[0]
  bare = fairface.Face(face.line, face.image_id, face.path,
                       {k: face.labels[k] for k in ("age", "gender", "race")})
  with pytest.raises(ValueError, match="needs the synthetic world's labels"):
    demo_vision.read_faces([bare], 112)
