"""ADM reference batches (``evaluate/reference.py``): the ``.npz`` written
and streamed back, damaged or foreign files named, ``kind=reference``'s
settings, a host whose workdir holds no file, statistics of a split."""

import json

import numpy as np
import pytest

from genvis_jax.errors import UserError
from genvis_jax.evaluate import adm_reference, npz, reference
from tests import metric_refs


def test_reference_npz_roundtrip_and_streaming(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
  mu, sigma = metric_refs.random_stats(rng, 4)
  mu_s, sigma_s = metric_refs.random_stats(rng, 3)
  path = adm_reference.save_reference(
      str(tmp_path / "ref.npz"), mu=mu, sigma=sigma, mu_s=mu_s,
      sigma_s=sigma_s, images=images, pool_features=np.ones((10, 4)),
      preprocess="adm_tf")
  ref = adm_reference.load_reference(path)
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma_s, sigma_s)
  assert ref.preprocess == "adm_tf" and ref.pool_features.shape == (10, 4)
  assert ref.images.shape == (10, 6, 5, 3) and len(ref.images) == 10
  batches = list(ref.images.batches(4))
  assert [len(b) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(batches), images)
  assert [len(b) for b in ref.images.batches(4, limit=5)] == [4, 1]
  # ADM's own files as np.savez / np.savez_compressed write them.
  with np.load(path) as d:
    assert set(d.files) >= {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}
  np.savez_compressed(tmp_path / "samples.npz", images)
  arr = npz.open_images(str(tmp_path / "samples.npz"))
  np.testing.assert_array_equal(np.concatenate(list(arr.batches(3))), images)
  np.savez(tmp_path / "fortran.npz", np.asfortranarray(images))   # column-major
  arr = npz.open_images(str(tmp_path / "fortran.npz"))
  np.testing.assert_array_equal(np.concatenate(list(arr.batches(3))), images)


def test_reference_errors(tmp_path):
  np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    npz.open_images(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="arr_0"):
    npz.open_images(str(tmp_path / "other.npz"))
  with pytest.raises(ValueError, match="not an ADM reference"):
    adm_reference.load_reference(str(tmp_path / "other.npz"))
  # mu and sigma alone are a torch-fidelity / pytorch-fid file (FID only);
  # other partial sets are damage.
  np.savez(tmp_path / "fid.npz", mu=np.zeros(3), sigma=np.eye(3))
  ref = adm_reference.load_reference(str(tmp_path / "fid.npz"))
  assert ref.fid_only and ref.origin == "fid_stats"
  np.savez(tmp_path / "partial.npz", mu=np.zeros(3), sigma=np.eye(3),
           sigma_s=np.eye(2))
  with pytest.raises(ValueError, match=r"not all of .* nor mu and sigma alone "
                     r"\(a pytorch-fid / torch-fidelity file: FID only\)"
                     r".*kind=reference"):
    adm_reference.load_reference(str(tmp_path / "partial.npz"))
  with pytest.raises(FileNotFoundError, match="kind=reference"):
    adm_reference.load_reference(str(tmp_path / "missing.npz"))
  stats = dict(mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=np.eye(2))
  np.savez(tmp_path / "nan.npz", **{**stats, "mu": np.array([0.0, np.nan, 0.0])})
  with pytest.raises(npz.NpzContentError, match=r"'mu' holds NaN or Inf"):
    adm_reference.load_reference(str(tmp_path / "nan.npz"))
  np.savez(tmp_path / "square.npz", **{**stats, "sigma_s": np.eye(3)})
  with pytest.raises(npz.NpzContentError, match=r"mu_s \(2,\) and sigma_s "
                     r"\(3, 3\) are not a mean vector and its covariance"):
    adm_reference.load_reference(str(tmp_path / "square.npz"))
  # A sampling workdir named instead of its samples.npz: the file suggested.
  (tmp_path / "run").mkdir()
  np.savez(tmp_path / "run" / "samples.npz", np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(npz.NpzFileError,
                     match=r"'.*run' \(config.evaluate.samples\) is a folder, "
                           r"not an .npz file; did you mean '.*run/samples.npz'"):
    npz.open_images(str(tmp_path / "run"), setting="config.evaluate.samples")
  # Class scores need the labels: a file without them is named, not a KeyError.
  import ml_collections   # pylint: disable=import-outside-toplevel
  from genvis_jax.evaluate import class_score   # pylint: disable=import-outside-toplevel
  np.savez(tmp_path / "unlabelled.npz", np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(npz.NpzContentError, match=r"holds no class labels \('labels' "
                     r"or 'arr_1'; it has \['arr_0'\]\)"):
    class_score.evaluate(ml_collections.ConfigDict({"evaluate": {
        "samples": str(tmp_path / "unlabelled.npz")}}), str(tmp_path))
  # The errors a user causes are UserErrors: one line, no traceback.
  with pytest.raises(UserError, match="not an ADM reference batch"):
    adm_reference.load_reference(str(tmp_path / "other.npz"))


def test_reference_kind_needs_inception_weights_and_a_known_resize(tmp_path):
  from configs import base
  from genvis_jax.errors import ConfigError
  config = base.get_config()
  config.evaluate.kind = "reference"
  with pytest.raises(ConfigError, match=r"config.evaluate.inception is not "
                     r"set: .*set --config.evaluate.inception=ckpt/inception "
                     r"after `python -m genvis_jax.convert --kind=inception "):
    reference.evaluate(config, str(tmp_path))
  with pytest.raises(npz.NpzFileError, match=r"config.evaluate.samples is not "
                     r"set: set --config.evaluate.samples=RUN/samples.npz, "
                     r"the file --config.mode=sample --workdir=RUN writes\.$"):
    npz.load_samples("")
  config.evaluate.inception = str(tmp_path / "inception.npz")
  config.evaluate.preprocess = "bilinear"
  with pytest.raises(ConfigError, match="preprocess='bilinear'; use one of"):
    reference.evaluate(config, str(tmp_path))


def test_reference_kind_on_a_host_whose_workdir_holds_no_file(tmp_path,
                                                             monkeypatch):
  """Each host with a workdir of its own: process 0 writes reference.npz
  on its disk only, so process 1 read a file it did not have (after the
  whole Inception pass) and told the user to run what just failed. The
  summary comes from process 0."""
  from configs import base
  from genvis_jax.core import multihost
  from genvis_jax.convert import inception
  config = base.get_config()
  config.evaluate.kind = "reference"
  config.evaluate.inception = "/weights/inception"
  host0 = tmp_path / "host0" / "reference.npz"
  adm_reference.save_reference(str(host0), mu=np.zeros(4), sigma=np.eye(4),
                               mu_s=np.zeros(2), sigma_s=np.eye(2),
                               num_images=7)
  monkeypatch.setattr(inception, "load_inception_params", lambda path: {})
  monkeypatch.setattr(reference, "compute_reference",
                      lambda data, params, path, **kw: path)   # wrote nothing
  monkeypatch.setattr(multihost.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost.jax, "process_index", lambda: 1)
  said = json.dumps(
      [7, adm_reference.describe(adm_reference.load_reference(str(host0)))])
  sent = []    # process 0's: no error (on_process_0), the summary, no error

  def broadcast(strings, size=0):
    sent.append(strings)
    return [said if len(sent) == 2 else ""]
  monkeypatch.setattr(multihost, "broadcast_strings", broadcast)
  res = reference.evaluate(config, str(tmp_path / "host1"))
  assert res["num_images"] == 7
  assert not (tmp_path / "host1" / "reference.npz").exists()


def test_compute_reference_from_demo_split(tmp_path):
  from configs import base
  from genvis_jax.data import DemoSource
  config = base.get_config()
  config.data.image_size = 32
  config.data.num_classes = 10
  config.data.read_threads = 2
  ex = metric_refs.FakeExtractor(batch_size=8)
  path = reference.compute_reference(
      config.data, None, str(tmp_path / "demo_ref.npz"), split="validation",
      num_images=20, num_stored_images=12, extractor=ex)
  ref = adm_reference.load_reference(path)
  src = DemoSource("validation")
  want = np.stack([src[i]["image"] for i in range(20)])
  stored = np.concatenate(list(ref.images.batches(5)))
  chosen = reference.stored_indices(20, 12)   # 32 px: crop = identity
  np.testing.assert_array_equal(stored, want[chosen])
  feats = np.concatenate([ex(want[i:i + 8])["pool"] for i in range(0, 20, 8)])
  np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-6)
  np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-6,
                             atol=1e-9)
  np.testing.assert_allclose(ref.pool_features, feats[chosen], rtol=1e-6)
  assert ref.mu_s.shape == (6,) and ref.sigma_s.shape == (6, 6)


def test_the_stored_subset_keeps_every_row_alike():
  """Algorithm R: each of 6 rows streamed in batches of 2 and 4 is kept
  with probability n / 6 = 1/2 (a row replacing slot U{0..i-1} kept the
  last ones 2/3 of the time)."""
  kept = np.zeros(6)
  trials = 3000
  for seed in range(trials):
    subset = reference.StoredSubset(3, seed)
    subset.offer(row=np.arange(2))
    subset.offer(row=np.arange(2, 6))
    rows, index = subset.result()
    np.testing.assert_array_equal(rows["row"], index)
    kept[index] += 1
  np.testing.assert_allclose(kept / trials, 0.5, atol=0.04)


def test_stored_images_spread_over_a_class_ordered_split(tmp_path):
  """An image folder lists its images class by class: the first 16 of 5
  classes x 8 were 2 classes, and samples drawn as the data scored
  precision 0.375 against that manifold."""
  from PIL import Image
  from configs import base
  from genvis_jax.evaluate import fid
  rng = np.random.default_rng(0)
  draw = lambda c: np.clip(rng.integers(0, 40, (8, 8, 3)) + 50 * c, 0,
                           255).astype(np.uint8)
  for c in range(5):   # class folders only: one folder for every split
    (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
    for i in range(8):
      Image.fromarray(draw(c)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
  config = base.get_config()
  config.data.update(dict(source="image_folder", path=str(tmp_path / "imgs"),
                          image_size=8, num_classes=5))
  ex = metric_refs.FakeExtractor(batch_size=8)
  ref = adm_reference.load_reference(reference.compute_reference(
      config.data, None, str(tmp_path / "r.npz"), num_stored_images=16,
      extractor=ex))
  stored = np.concatenate(list(ref.images.batches(8)))
  assert len(stored) == 16
  assert set(stored.mean((1, 2, 3)).astype(int) // 50) == set(range(5))
  samples = np.stack([draw(c) for c in range(5) for _ in range(8)])
  feats = np.concatenate([ex(samples[i:i + 8])["pool"]
                          for i in range(0, 40, 8)])
  precision, _ = fid.precision_recall(ref.pool_features, feats, 3)
  assert precision > 0.9


def test_a_reference_of_the_training_images_says_so(tmp_path, monkeypatch):
  """A folder without split folders: the reference reads the training
  images (warned in the log), and its metrics.json said only
  "split": "validation"; the caveat is there too now."""
  from configs import base
  from genvis_jax.convert import inception
  (tmp_path / "imgs" / "cat").mkdir(parents=True)
  config = base.get_config()
  config.data.update(source="image_folder", path=str(tmp_path / "imgs"))
  config.evaluate.update(kind="reference", inception="/weights/inception")
  monkeypatch.setattr(inception, "load_inception_params", lambda path: {})

  def compute(data, params, path, **kw):
    adm_reference.save_reference(path, mu=np.zeros(4), sigma=np.eye(4),
                                 mu_s=np.zeros(2), sigma_s=np.eye(2),
                                 num_images=3)
    return path
  monkeypatch.setattr(reference, "compute_reference", compute)
  res = reference.evaluate(config, str(tmp_path / "wd"))
  assert res["split"] == "validation"
  assert len(res["caveats"]) == 1 and "reads the same images as training" in (
      res["caveats"][0])
  with open(tmp_path / "wd" / "metrics.json") as f:
    assert json.load(f)["caveats"] == res["caveats"]
  (tmp_path / "imgs" / "cat").rename(tmp_path / "cat")
  for split in ("train", "val"):
    (tmp_path / "imgs" / split / "cat").mkdir(parents=True)
  assert reference.evaluate(config, str(tmp_path / "wd2"))["caveats"] == []
