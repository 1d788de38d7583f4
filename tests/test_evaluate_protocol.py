"""The FID protocol (references record how they were made; preprocess "auto";
mismatches refused; distances >= 0) and evaluation over exact image counts at
batch sizes that do and do not divide the count (padding masked out).
Tokenizer evaluation: ``tests/test_evaluate_tokenizer.py``."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.errors import UserError
from genvis_jax.evaluate import (adm_reference, batching, fid, generation, npz,
                                 reference)
from tests import metric_refs


# --- distances and streaming statistics ---------------------------------------------------

def test_frechet_distance_is_clamped_at_zero():
  f = np.random.default_rng(0).normal(size=(50, 8))
  mu, s = metric_refs.feature_stats(f)
  raw = metric_refs.frechet_formula(mu, s, mu, s)
  assert raw < 0          # rounding makes the formula negative for this set
  assert fid.frechet_distance(mu, s, mu, s) == 0.0
  mu2, s2 = metric_refs.feature_stats(f[:40] + 0.3)
  assert fid.frechet_distance(mu, s, mu2, s2) == pytest.approx(
      metric_refs.frechet_formula(mu, s, mu2, s2), rel=1e-10)


def test_streaming_stats_mask_keeps_padding_out():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(13, 5)) * 2 + 7
  acc = fid.StreamingStats()
  for i in range(0, 13, 4):   # 4 + 4 + 4 + 1, each padded with junk to 4
    part, mask = batching.pad_batch(feats[i:i + 4], 4)
    part[~mask] = 1e6
    acc.update(part, mask)
  mu, sigma = acc.result()
  assert acc.count == 13
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9)
  with pytest.raises(ValueError, match="mask"):
    acc.update(feats[:4], np.ones(3, bool))


def test_exact_batches_counts_and_errors():
  src = [np.arange(5), np.arange(5, 7), np.arange(7, 20)]   # ragged source
  for size in (4, 13):
    got = list(batching.exact_batches(src, 13, size, "src", "num"))
    assert all(len(b) == size and len(m) == size for b, m, _ in got)
    assert sum(k for _, _, k in got) == 13
    vals = np.concatenate([b[m] for b, m, _ in got])
    np.testing.assert_array_equal(vals, np.arange(13))
  with pytest.raises(batching.NotEnoughImages, match=r"ended after 20 .*21"):
    list(batching.exact_batches(src, 21, 4, "src", "cfg.num"))
  with pytest.raises(batching.NotEnoughImages, match=r"has 20 .* 21 .*cfg\.n"):
    batching.check_count(21, 20, "data", "cfg.n")
  assert batching.check_count(0, 20, "data", "cfg.n") == 20
  # "All" of a source that skips unreadable files: the rows there are.
  for size, total in ((4, 23), (4, 20), (3, 30), (25, 23)):
    got = list(batching.exact_batches(src, total, size, "src", "num", up_to=True))
    assert [k for _, _, k in got] == [min(size, 20 - i) for i in range(0, 20, size)]
    np.testing.assert_array_equal(np.concatenate([b[m] for b, m, _ in got]),
                                  np.arange(20))
  assert issubclass(batching.NotEnoughImages, UserError)


def test_map_padded_runs_one_program_ahead_of_reading_back(monkeypatch):
  """23 rows in batches of 8: one traced shape, the rows back in order without
  the padding's, a pytree of outputs, ``prepare`` on each host slice, the
  weights uploaded once, and batch i + 1 dispatched before batch i is read
  back (at most ``in_flight`` ahead)."""
  from genvis_jax.core import padded
  traces, events, weights = [], [], []

  @jax.jit
  def fn(p, x):
    traces.append(x.shape)
    return {"sum": x.sum(1) * p["w"], "first": x[:, 0]}

  def run(p, x):
    events.append("run")
    weights.append(p["w"])
    return fn(p, x)
  get = jax.device_get
  monkeypatch.setattr(padded.jax, "device_get",
                      lambda tree: events.append("read") or get(tree))
  x = np.arange(23 * 3).reshape(23, 3)
  out = padded.map_padded(run, {"w": np.float32(2)}, x, 8, in_flight=1,
                          prepare=lambda rows: rows.astype(np.float32) / 2)
  np.testing.assert_array_equal(out["sum"], x.sum(1).astype(np.float32))
  np.testing.assert_array_equal(out["first"], x[:, 0] / np.float32(2))
  assert traces == [(8, 3)] and fn._cache_size() == 1
  assert events == ["run", "run", "read", "run", "read", "read"]
  assert isinstance(weights[0], jax.Array)
  assert all(w is weights[0] for w in weights)
  with pytest.raises(ValueError, match="0 rows"):
    padded.map_padded(run, None, x[:0], 8)


# --- generation metrics over exact counts -------------------------------------------------

@pytest.fixture(scope="module")
def gen_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("gen")
  rng = np.random.default_rng(5)
  samples, other = metric_refs.images(rng, 13), metric_refs.images(rng, 11, shift=50)
  np.savez(d / "samples.npz", samples)
  np.savez(d / "ref.npz", other)      # images only: stats computed here
  return d, samples, other


@pytest.mark.parametrize("batch", [4, 13])
def test_generation_metrics_cover_exact_count(gen_files, batch):
  d, samples, other = gen_files
  ex = metric_refs.FakeExtractor(batch_size=batch)
  res = generation.evaluate_samples(str(d / "samples.npz"),
                                     str(d / "ref.npz"), extractor=ex,
                                     distance_dtype="float32")
  # The official formulas over exactly the 13 / 11 images' features.
  fs, fr = metric_refs.FakeExtractor(13)(samples), metric_refs.FakeExtractor(13)(other)
  assert res["num_samples"] == 13 and res["num_reference"] == 11
  assert res["fid"] == pytest.approx(
      metric_refs.frechet_formula(*metric_refs.feature_stats(fs["pool"]), *metric_refs.feature_stats(fr["pool"])), rel=1e-6)
  assert res["sfid"] == pytest.approx(
      metric_refs.frechet_formula(*metric_refs.feature_stats(fs["spatial"]), *metric_refs.feature_stats(fr["spatial"])),
      rel=1e-6)
  assert res["inception_score"] == pytest.approx(
      metric_refs.inception_score(fs["logits"].astype(np.float64), 5000), rel=1e-6)
  p, r, _ = metric_refs.precision_recall(fr["pool"], fs["pool"])
  assert (res["precision"], res["recall"]) == pytest.approx((p, r))
  assert res["preprocess"] == "pytorch_fid"
  with pytest.raises(batching.NotEnoughImages,
                     match=r"13 images but 14 .*num_samples"):
    generation.evaluate_samples(str(d / "samples.npz"), str(d / "ref.npz"),
                                 extractor=ex, num_samples=14)


def test_precision_and_recall_are_not_swapped(tmp_path):
  """Samples that all copy 3 of the 12 reference images: precision 1, recall
  below 1 (ADM evaluator.py: compute_prec_recall(activations_ref,
  activations_sample)). The fixture above gives p = r = 0, which cannot tell
  the two apart."""
  ref = metric_refs.images(np.random.default_rng(0), 12)
  samples = np.concatenate([ref[:3]] * 4 + [ref[:1]])          # 13 samples
  np.savez(tmp_path / "s.npz", samples)
  np.savez(tmp_path / "r.npz", ref)
  res = generation.evaluate_samples(str(tmp_path / "s.npz"), str(tmp_path / "r.npz"),
                                     extractor=metric_refs.FakeExtractor(13),
                                     distance_dtype="float32")
  assert res["precision"] == 1.0 and res["recall"] < 1.0
  p, r, _ = metric_refs.precision_recall(metric_refs.FakeExtractor(13)(ref)["pool"],
                                         metric_refs.FakeExtractor(13)(samples)["pool"])
  assert (res["precision"], res["recall"]) == pytest.approx((p, r))


@pytest.mark.parametrize("batch", [4, 13])
def test_compute_reference_exact_count_and_record(tmp_path, batch):
  from configs import base
  from genvis_jax.data import DemoSource
  config = base.get_config()
  config.data.image_size = 32
  config.data.num_classes = 10
  config.data.num_examples = 20
  ex = metric_refs.FakeExtractor(batch_size=batch)
  ex.preprocess, ex.weights_id = "adm_tf", "0123abcd"
  path = reference.compute_reference(config.data, None, str(tmp_path / "r.npz"),
                                     split="validation", num_images=13,
                                     num_stored_images=5, extractor=ex)
  ref = adm_reference.load_reference(path)
  src = DemoSource("validation", num_examples=20)
  want = metric_refs.FakeExtractor(13)(np.stack([src[i]["image"] for i in range(13)]))
  mu, sigma = metric_refs.feature_stats(want["pool"])
  np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
  np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-6, atol=1e-9)
  assert (ref.preprocess, ref.inception_weights, ref.num_images) == (
      "adm_tf", "0123abcd", 13)
  assert ref.origin == "recorded" and len(ref.images) == 5
  with pytest.raises(batching.NotEnoughImages, match=r"has 20 .* 21"):
    reference.compute_reference(config.data, None, str(tmp_path / "x.npz"),
                                split="validation", num_images=21, extractor=ex)


def test_python_reference_resizes_as_the_command_line(tmp_path, monkeypatch):
  """compute_reference without a preprocess builds its Inception with the
  command line's ``auto`` resize, ADM's ``adm_tf`` (pytorch_fid before: a
  reference made in Python measured FID with another resize), and records it."""
  from configs import base
  made = {}

  def extractor(params, **kw):
    del params
    ex = metric_refs.FakeExtractor(batch_size=kw["batch_size"])
    ex.preprocess, ex.weights_id = kw["preprocess"], "0123abcd"
    made.update(kw)
    return ex
  monkeypatch.setattr(reference.inception_lib, "InceptionExtractor", extractor)
  config = base.get_config()
  config.data.update(dict(image_size=32, num_classes=10, num_examples=8))
  path = reference.compute_reference(config.data, None, str(tmp_path / "r.npz"),
                                     split="validation", num_images=4,
                                     batch_size=4)
  assert made["preprocess"] == adm_reference.ADM_PREPROCESS == "adm_tf"
  assert adm_reference.load_reference(path).preprocess == "adm_tf"


def test_reference_of_all_images_skips_unreadable_files(tmp_path):
  """num_images=0 ("all") of a folder with an unreadable file: the statistics
  cover the images that decode, and the record says how many."""
  from PIL import Image
  from configs import base
  root = tmp_path / "imgs" / "a"     # one folder for every split
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  for i, img in enumerate(images):
    Image.fromarray(img).save(root / f"{i}.png")
  (root / "2b.png").write_bytes(b"not a png")      # sorts among the good ones
  config = base.get_config()
  config.data.update(dict(source="image_folder", path=str(tmp_path / "imgs"),
                          image_size=32, random_flip=False))
  ex = metric_refs.FakeExtractor(batch_size=4)
  path = reference.compute_reference(config.data, None, str(tmp_path / "r.npz"),
                                     split="validation", num_images=0,
                                     extractor=ex)
  ref = adm_reference.load_reference(path)
  mu, sigma = metric_refs.feature_stats(metric_refs.FakeExtractor(6)(images)["pool"])
  assert ref.num_images == 6
  np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
  np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-6, atol=1e-9)
  # The stored subset is chosen among the images read: chosen among the
  # split's 7 files, one position fell on no image and 4 of 5 were kept.
  five = adm_reference.load_reference(reference.compute_reference(
      config.data, None, str(tmp_path / "r5.npz"), split="validation",
      num_images=0, num_stored_images=5, extractor=ex))
  stored = np.concatenate(list(five.images.batches(5)))
  assert len(stored) == 5
  np.testing.assert_array_equal(stored, images[reference.stored_indices(6, 5)])
  with pytest.raises(batching.NotEnoughImages,
                     match=r"ended after 6 images but 7 .*unreadable files"):
    reference.compute_reference(config.data, None, str(tmp_path / "x.npz"),
                                split="validation", num_images=7, extractor=ex)


def test_a_reference_of_mu_and_sigma_alone_gives_fid_and_is(gen_files,
                                                             tmp_path):
  """The Equivariant repository scores with torch-fidelity against
  fid_stats/adm_in256_stats.npz, mu and sigma alone: refused before; now FID
  and its IS (shuffled splits), the metrics it cannot give named."""
  d, samples, other = gen_files
  mu, sigma = metric_refs.feature_stats(
      metric_refs.FakeExtractor(13)(other)["pool"])
  np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
  res = generation.evaluate_samples(
      str(d / "samples.npz"), str(tmp_path / "stats.npz"),
      extractor=metric_refs.FakeExtractor(batch_size=4),
      inception_score="torch_fidelity")
  fs = metric_refs.FakeExtractor(13)(samples)
  assert res["fid"] == pytest.approx(metric_refs.frechet_formula(
      *metric_refs.feature_stats(fs["pool"]), mu, sigma), rel=1e-6)
  assert res["inception_score"] == pytest.approx(
      fid.inception_score_shuffled(fs["logits"]), rel=1e-6)
  assert (res["sfid"], res["precision"], res["recall"]) == (None,) * 3
  assert res["not_computed"] == ["sfid", "precision", "recall"]
  assert (res["preprocess"], res["num_reference"]) == ("adm_tf", None)
  assert "sFID n/a" in generation.format_metrics(res)
  assert any("so FID is not comparable" in c for c in res["caveats"])
  np.savez(tmp_path / "half.npz", mu=mu, sigma=sigma, mu_s=np.zeros(6))
  with pytest.raises(npz.NpzContentError, match=r"nor mu and sigma alone"):
    generation.evaluate_samples(str(d / "samples.npz"),
                                str(tmp_path / "half.npz"),
                                extractor=metric_refs.FakeExtractor(4))
  with pytest.raises(ValueError, match=r"inception_score='tf'"):
    generation.evaluate_samples(str(d / "samples.npz"),
                                str(tmp_path / "stats.npz"),
                                extractor=metric_refs.FakeExtractor(4),
                                inception_score="tf")


# --- the preprocessing protocol -------------------------------------------------------------

def _save_stats(path, d_pool, d_spatial, images=True, **record):
  rng = np.random.default_rng(0)
  kw = dict(mu=np.zeros(d_pool), sigma=np.eye(d_pool), mu_s=np.zeros(d_spatial),
            sigma_s=np.eye(d_spatial))
  if images:
    kw["images"] = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  return adm_reference.load_reference(
      adm_reference.save_reference(str(path), **kw, **record))


def test_adm_format_reference_selects_adm_tf(tmp_path):
  # ADM's layout: arr_0 + 2048-d mu/sigma + 2023-d mu_s/sigma_s, no record.
  ref = _save_stats(tmp_path / "VIRTUAL_imagenet256_labeled.npz", 2048, 2023)
  assert ref.origin == "adm"
  assert adm_reference.resolve_preprocess(ref, "auto") == "adm_tf"
  assert adm_reference.resolve_preprocess(ref, "adm_tf") == "adm_tf"
  with pytest.raises(adm_reference.ProtocolMismatch) as e:
    adm_reference.resolve_preprocess(ref, "pytorch_fid")
  msg = str(e.value)
  for word in ("adm_tf", "pytorch_fid", "ADM", "config.evaluate.preprocess=auto"):
    assert word in msg
  assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
  # The same statistics without the images: still ADM's layers (2023-d sFID).
  stats_only = adm_reference.Reference(
      "adm_stats.npz", mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s,
      sigma_s=ref.sigma_s)
  assert stats_only.origin == "adm"
  assert adm_reference.resolve_preprocess(stats_only) == "adm_tf"


def test_recorded_unknown_and_images_only_references(tmp_path, caplog):
  rec = _save_stats(tmp_path / "rec.npz", 6, 3, preprocess="pytorch_fid",
                    inception_weights="aa11", num_images=50)
  assert rec.origin == "recorded" and rec.num_images == 50
  assert adm_reference.resolve_preprocess(rec, "auto") == "pytorch_fid"
  with pytest.raises(adm_reference.ProtocolMismatch,
                     match=r"'pytorch_fid'.*'adm_tf'"):
    adm_reference.resolve_preprocess(rec, "adm_tf")
  adm_reference.check_inception_weights(rec, "aa11")
  adm_reference.check_inception_weights(rec, None)  # weights unknown: no check
  with pytest.raises(adm_reference.ProtocolMismatch, match=r"aa11.*bb22"):
    adm_reference.check_inception_weights(rec, "bb22")
  with pytest.raises(adm_reference.ProtocolMismatch, match="Unknown"):
    adm_reference.resolve_preprocess(rec, "bicubic")

  unknown = _save_stats(tmp_path / "unknown.npz", 6, 3)   # no record, not ADM
  assert unknown.origin == "unknown"
  caplog.set_level(logging.WARNING)
  assert adm_reference.resolve_preprocess(unknown, "auto") == "pytorch_fid"
  assert "unknown origin" in caplog.text
  caplog.clear()
  assert adm_reference.resolve_preprocess(unknown, "adm_tf") == "adm_tf"
  assert "unknown origin" in caplog.text

  caplog.clear()
  np.savez(tmp_path / "imgs.npz", np.zeros((3, 8, 8, 3), np.uint8))
  imgs = adm_reference.load_reference(str(tmp_path / "imgs.npz"))
  assert imgs.origin == "images"
  assert adm_reference.resolve_preprocess(imgs, "auto") == "pytorch_fid"
  assert adm_reference.resolve_preprocess(imgs, "adm_tf") == "adm_tf"
  assert "unknown origin" not in caplog.text


def test_evaluate_samples_follows_and_enforces_the_record(tmp_path):
  rng = np.random.default_rng(2)
  samples, other = metric_refs.images(rng, 12), metric_refs.images(rng, 12, shift=40)
  np.savez(tmp_path / "s.npz", samples)
  feats = metric_refs.FakeExtractor(12)(other)
  adm_reference.save_reference(
      str(tmp_path / "r.npz"), images=other, preprocess="adm_tf",
      inception_weights="w1", num_images=12,
      **dict(zip(("mu", "sigma"), metric_refs.feature_stats(feats["pool"]))),
      **dict(zip(("mu_s", "sigma_s"), metric_refs.feature_stats(feats["spatial"]))))
  ex = metric_refs.FakeExtractor()
  ex.preprocess, ex.weights_id = "adm_tf", "w1"
  res = generation.evaluate_samples(str(tmp_path / "s.npz"),
                                     str(tmp_path / "r.npz"), extractor=ex)
  assert res["preprocess"] == "adm_tf" and res["fid"] > 0
  with pytest.raises(adm_reference.ProtocolMismatch, match="pytorch_fid"):
    generation.evaluate_samples(str(tmp_path / "s.npz"),
                                 str(tmp_path / "r.npz"), extractor=ex,
                                 preprocess="pytorch_fid")
  ex.weights_id = "w2"
  with pytest.raises(adm_reference.ProtocolMismatch, match="w1"):
    generation.evaluate_samples(str(tmp_path / "s.npz"),
                                 str(tmp_path / "r.npz"), extractor=ex)
  # A set against itself: exactly 0, never negative.
  np.savez(tmp_path / "same.npz", samples)
  same = generation.evaluate_samples(str(tmp_path / "s.npz"),
                                      str(tmp_path / "same.npz"),
                                      extractor=metric_refs.FakeExtractor())
  assert same["fid"] >= 0.0 and same["sfid"] >= 0.0


def test_weights_fingerprint_identifies_the_values():
  from genvis_jax.models import inception
  rng = np.random.default_rng(3)
  tree = {"a": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
          "b": {"scale": np.ones(4, np.float32)}}
  fp = inception.weights_fingerprint(tree)
  assert fp == inception.weights_fingerprint(
      jax.tree_util.tree_map(jnp.asarray, tree))
  tree["b"]["scale"][1] += 1e-6
  assert inception.weights_fingerprint(tree) != fp


def test_incomparable_metrics_are_flagged():
  from genvis_jax.evaluate import generation  # pylint: disable=import-outside-toplevel
  assert not generation.warn_incomparable(50_000, (50_000, 256, 256, 3),
                                           (10_000, 256, 256, 3))
  notes = generation.warn_incomparable(16, (16, 32, 512, 3), (32, 32, 64, 3))
  assert len(notes) == 2
  assert "only 16 samples" in notes[0] and "32x512" in notes[1]


def test_a_reference_of_token_files_is_refused_naming_the_image_sources():
  """kind=reference on a generator's config, whose data are token files:
  one message naming the image sources (it said to point data.path at the
  token files)."""
  from genvis_jax.errors import ConfigError
  from tests import pipeline_common as pc
  config = pc.load_config("far_b.py:dual,runlocal", **{
      "mode": "evaluate", "evaluate.kind": "reference",
      "evaluate.inception": "/nowhere/inception.npz"})
  with pytest.raises(ConfigError, match=r"kind=reference computes Inception "
                     r"statistics of images, and config.data reads token "
                     r"files.*--config.data.source=tfds"):
    reference.evaluate(config, "/nowhere/out")


def test_a_singular_product_warns_once_in_our_words():
  """scipy's own LinAlgWarning (with its source line) stays out of the log;
  a product that sqrtm cannot take says what FID does instead."""
  import warnings   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 64))
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    d = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                             np.zeros(64), np.zeros((64, 64)))
  assert np.isfinite(d)
  assert [str(w.message) for w in seen] == [
      "FID: the covariance product is singular (fewer images than feature "
      "dimensions?); its square root may be inaccurate."]
