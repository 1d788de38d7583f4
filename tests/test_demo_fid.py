"""Demo-scale FID on the demo classifier's features: identical sets score ~0,
two draws of the real demo data score low, shifted / random images high; the
demo evaluators cover exactly the requested image counts at any batch size."""

import jax
import ml_collections
import numpy as np
import pytest

from genvis_jax import models
from genvis_jax.data import demo_shapes
from genvis_jax.evaluate.demo_fid import classifier_features, demo_fid


@pytest.fixture(scope="module")
def classifier():
  cfg = ml_collections.ConfigDict(dict(name="classifier", num_classes=10,
                                       widths=(16, 32), image_size=32))
  return models.init_params(cfg, jax.random.key(0)), cfg


def test_demo_fid_orders_distributions(classifier):
  params, cfg = classifier
  real, _ = demo_shapes(256, seed=1)
  other, _ = demo_shapes(256, seed=2)
  shifted = np.clip(other.astype(np.int32) + 60, 0, 255).astype(np.uint8)
  noise = np.random.default_rng(0).integers(0, 256, other.shape, dtype=np.uint8)
  feats = classifier_features(real, params, cfg, batch_size=100)
  assert feats.shape == (256, 32) and np.isfinite(feats).all()
  same = demo_fid(real, real, params, cfg)
  real_vs_real = demo_fid(other, real, params, cfg)
  # float [0, 1] references are accepted as well as uint8.
  assert demo_fid(other, real / 255.0, params, cfg) == pytest.approx(
      real_vs_real, rel=1e-4)
  d_shift = demo_fid(shifted, real, params, cfg)
  d_noise = demo_fid(noise, real, params, cfg)
  scale = np.trace(np.cov(feats, rowvar=False))
  assert abs(same) < 1e-6 * scale
  assert d_shift > 3 * real_vs_real
  assert d_noise > 3 * real_vs_real
  with pytest.raises(ValueError, match="at least 2"):
    demo_fid(real[:1], real, params, cfg)


def test_demo_fid_compiles_the_features_once(classifier):
  """Samples and references go through one compiled features program, not
  one built per set."""
  from genvis_jax.evaluate import demo_fid as demo_fid_lib
  params, cfg = classifier
  a, _ = demo_shapes(9, seed=4)
  b, _ = demo_shapes(9, seed=5)
  before = demo_fid_lib._features._cache_size()
  assert demo_fid(a, b, params, cfg, batch_size=7) > 0   # a shape of its own
  assert demo_fid_lib._features._cache_size() == before + 1


@pytest.mark.parametrize("batch", [4, 13])
def test_demo_evaluators_cover_exact_count(classifier, tmp_path, monkeypatch,
                                          batch):
  from configs import base
  from genvis_jax.evaluate import batching
  from genvis_jax.evaluate.class_score import conditioning_accuracy
  from genvis_jax.evaluate.demo_fid import evaluate
  params, cfg = classifier
  images, labels = demo_shapes(13, seed=3)
  whole = classifier_features(images, params, cfg, batch_size=13)
  feats = classifier_features(images, params, cfg, batch_size=batch)
  assert feats.shape == (13, 32)
  np.testing.assert_allclose(feats, whole, rtol=1e-5, atol=1e-6)
  model = models.build(cfg)
  pred = np.asarray(model.apply({"params": params},
                                images.astype(np.float32) / 255)).argmax(-1)
  labels = np.asarray(labels)
  labels[:5] = pred[:5]                   # some hits, some misses
  want = float(np.mean(pred == labels))
  assert conditioning_accuracy(model, params, images, labels,
                               batch_size=batch) == pytest.approx(want)
  with pytest.raises(ValueError, match="13 images but 12 labels"):
    conditioning_accuracy(model, params, images, labels[:12])
  # The reference must hold the requested number of real images.
  np.savez(tmp_path / "s.npz", images)
  monkeypatch.setattr(models, "load_params", lambda c, d, **kw: params)
  config = base.get_config()
  config.model = cfg
  config.data.update(dict(image_size=32, num_classes=10, num_examples=20))
  config.evaluate = ml_collections.ConfigDict(dict(
      kind="demo_fid", samples=str(tmp_path / "s.npz"),
      classifier_checkpoint="/c", num_reference=21, batch_size=batch))
  with pytest.raises(batching.NotEnoughImages,
                     match=r"20 images but 21 .*num_reference"):
    evaluate(config, str(tmp_path / "out"))
  config.evaluate.num_reference = 13
  res = evaluate(config, str(tmp_path / "out"))
  assert res["num_reference"] == 13 and res["demo_fid"] >= 0.0
