"""FID / sFID / IS / precision-recall maths, unreadable sample files, the
generation metrics pipeline (with a cheap stand-in feature network), SSIM
and codebook usage (reference batches: ``test_reference.py``)."""

import json
import os
import pickle

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from genvis_jax.core import sharding
from genvis_jax.evaluate import (adm_reference, batching, fid, generation,
                                 image_metrics, npz, protocols)
from tests import metric_refs


# --- Fréchet distance -----------------------------------------------------------------

def test_frechet_distance_matches_scipy_reference():
  rng = np.random.default_rng(0)
  mu1, s1 = metric_refs.random_stats(rng, 24)
  mu2, s2 = metric_refs.random_stats(rng, 24)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  # Reference 1: the textbook formula with scipy's sqrtm.
  ref = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
         - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
  # Reference 2: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) (symmetric).
  r1 = linalg.sqrtm(s1).real
  eig = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
  ref2 = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * np.sum(np.sqrt(eig)))
  assert got == pytest.approx(ref, rel=1e-10)
  assert got == pytest.approx(ref2, rel=1e-8)
  assert got == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_frechet_distance_diagonal_closed_form_and_errors():
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
  want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)
  with pytest.raises(ValueError, match="same feature layer"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  # max(0, nan) is 0: NaN statistics must not score a perfect FID.
  with pytest.raises(ValueError, match="second statistics' mean hold NaN"):
    fid.frechet_distance(mu1, np.diag(a), np.array([0.0, np.nan, 0.0]), np.diag(b))


def test_streaming_stats_equal_batch_stats():
  rng = np.random.default_rng(1)
  feats = (rng.normal(size=(203, 17)) * 3 + 1e3).astype(np.float32)
  acc = fid.StreamingStats()
  for i in (0, 50, 51, 140):
    acc.update(feats[i:{0: 50, 50: 51, 51: 140, 140: 203}[i]])
  mu, sigma = acc.result()
  mu_ref, sigma_ref = fid.feature_stats(feats)
  assert acc.count == 203
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-9)
  with pytest.raises(ValueError, match="Feature size changed"):
    acc.update(np.zeros((2, 5)))


# --- Inception Score --------------------------------------------------------------------

def test_inception_score_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(1100, 30)) * 3
  got = fid.inception_score(logits, split_size=500)   # 3 splits, last partial
  assert got == pytest.approx(metric_refs.inception_score(logits, 500), rel=1e-10)
  assert fid.inception_score(np.zeros((100, 8))) == pytest.approx(1.0)
  # Confident, evenly spread predictions over C classes: IS -> C.
  peaked = np.full((400, 8), -50.0)
  peaked[np.arange(400), np.arange(400) % 8] = 50.0
  assert fid.inception_score(peaked) == pytest.approx(8.0, rel=1e-6)
  with pytest.raises(ValueError, match="split_size must be >= 0"):
    fid.inception_score(logits, split_size=-1)   # looped forever


def test_the_inception_score_splits_are_adms_5000_by_default():
  """ADM's evaluator scores consecutive 5,000-sample splits (10 for 50k);
  the suite's sets are smaller, where any split of 5,000 or more is one."""
  import inspect   # pylint: disable=import-outside-toplevel
  logits = np.random.default_rng(3).normal(size=(10_000, 8)) * 3
  got = fid.inception_score(logits)
  assert got == pytest.approx(metric_refs.inception_score(logits, 5000),
                              rel=1e-10)
  assert got != pytest.approx(metric_refs.inception_score(logits, 10_000),
                              rel=1e-6)
  assert fid.StreamingInceptionScore().split_size == 5000
  assert inspect.signature(generation.evaluate_samples).parameters[
      "is_split_size"].default == 5000


def test_streaming_inception_score_matches_both_protocols():
  """Batch by batch, across split boundaries: ADM's splits (the generation
  evaluation's formula) and 1d-tokenizer's one split with eps 1e-16."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(23, 30)) * 3
  adm, one = fid.StreamingInceptionScore(7), fid.StreamingInceptionScore(0, 1e-16)
  for i in range(0, 23, 5):          # batches of 5 straddle the splits of 7
    adm.update(logits[i:i + 5])
    one.update(logits[i:i + 5])
    assert adm.result() == pytest.approx(      # so far, a partial split too
        metric_refs.inception_score(logits[:i + 5], 7), rel=1e-10)
  assert adm.result() == pytest.approx(fid.inception_score(logits, 7),
                                       rel=1e-10)
  assert one.result() == pytest.approx(
      metric_refs.tokenizer_inception_score(logits), rel=1e-6)
  with pytest.raises(ValueError, match="No logits"):
    fid.StreamingInceptionScore().result()


# --- precision / recall -----------------------------------------------------------------

def test_precision_recall_match_numpy():
  rng = np.random.default_rng(3)
  ref = rng.normal(size=(150, 12)).astype(np.float32)
  sam = (rng.normal(size=(130, 12)) * 1.3 + 0.4).astype(np.float32)
  p_ref, r_ref, radii_ref = metric_refs.precision_recall(ref, sam)
  assert 0.1 < p_ref < 0.95 and 0.1 < r_ref < 0.99   # a non-trivial case
  mesh = sharding.data_mesh(jax.devices()[:4])
  # Blocks that do not divide the sets (padding, several row/col blocks).
  radii = fid.manifold_radii(ref, row_block=36, col_block=64,
                             distance_dtype="float32", mesh=mesh)
  np.testing.assert_allclose(radii, radii_ref, rtol=1e-4)
  got = fid.precision_recall(ref, sam, row_block=36, col_block=64,
                             distance_dtype="float32", mesh=mesh)
  assert got == pytest.approx((p_ref, r_ref), abs=1e-12)
  # ADM's float16 distances move at most a few borderline points.
  p16, r16 = fid.precision_recall(ref, sam, mesh=mesh)
  assert abs(p16 - p_ref) <= 0.02 and abs(r16 - r_ref) <= 0.02
  assert fid.precision_recall(ref, ref, distance_dtype="float32",
                              mesh=mesh) == (1.0, 1.0)
  # Another dtype (int8, bf16) gave other numbers without a word.
  from genvis_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"config.evaluate.distance_dtype="
                                        r"'bfloat16' is not one of"):
    fid.precision_recall(ref, sam, distance_dtype="bfloat16", mesh=mesh)


# --- sample and feature files ------------------------------------------------------------

def test_unreadable_npz_files_are_named_with_the_fix(tmp_path):
  """A file cut short (a copy that did not finish), a single ``.npy`` array
  and a pickle are refused by name as samples or reference, with the fix,
  not as zipfile / numpy tracebacks."""
  images = np.zeros((4, 8, 8, 3), np.uint8)
  np.savez(tmp_path / "whole.npz", images)
  data = (tmp_path / "whole.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
  np.save(tmp_path / "one.npy", images)
  os.replace(tmp_path / "one.npy", tmp_path / "one.npz")
  np.save(tmp_path / "objects.npz", np.array([{}], dtype=object))
  os.replace(tmp_path / "objects.npz.npy", tmp_path / "objects.npz")
  Image.new("RGB", (4, 4)).save(tmp_path / "grid.png")
  with open(tmp_path / "pickled.npz", "wb") as f:
    pickle.dump({"arr_0": images}, f)
  ex = metric_refs.FakeExtractor()
  for name, message in (("cut", "is not a readable .npz file .* cut short"),
                        ("one", r"holds a single array \(.npy\), not an .npz"),
                        ("objects", r"(holds a single array|is not a readable "
                                    r".npz)"),
                        ("grid.png", r"is not an .npz file: it is a PNG image"),
                        ("pickled", r"is not an .npz file: it is a pickle")):
    bad = str(tmp_path / (name if "." in name else f"{name}.npz"))
    with pytest.raises(npz.NpzFileError,
                       match=r"\(config.evaluate.samples\) " + message):
      generation.evaluate_samples(bad, str(tmp_path / "whole.npz"), extractor=ex)
    with pytest.raises(npz.NpzFileError,
                       match=r"\(config.evaluate.reference\) " + message) as e:
      generation.evaluate_samples(str(tmp_path / "whole.npz"), bad, extractor=ex)
    assert "mode=sample" not in str(e.value)   # a reference's fix, not samples'
    with pytest.raises(npz.NpzFileError, match=message):
      npz.open_images(bad)
  # Statistics without images: refused before the samples' features (50,000
  # images at full size) are computed, not after.
  np.savez(tmp_path / "stats.npz", mu=np.zeros(10), sigma=np.eye(10),
           mu_s=np.zeros(6), sigma_s=np.eye(6))
  with pytest.raises(npz.NpzContentError, match=r"statistics but no images .*"
                     r"precision and recall need the reference images"):
    generation.evaluate_samples(str(tmp_path / "whole.npz"),
                                str(tmp_path / "stats.npz"), extractor=ex)
  # Statistics of another network, too few samples or reference images for
  # precision / recall (k = 3): refused before any image is measured, where
  # they failed after all of them with a traceback.
  stats = dict(mu=np.zeros(768), sigma=np.eye(768), mu_s=np.zeros(6),
               sigma_s=np.eye(6))
  np.savez(tmp_path / "other_net.npz", images, **stats)
  with pytest.raises(npz.NpzContentError,
                     match=r"statistics of 768 pool and 6 spatial features, "
                           r"but the FID Inception computes 10 and 6"):
    generation.evaluate_samples(str(tmp_path / "whole.npz"),
                                str(tmp_path / "other_net.npz"), extractor=ex)
  with pytest.raises(batching.NotEnoughImages,
                     match=r"^3 samples: .* need at least 4 .*num_samples"):
    generation.evaluate_samples(str(tmp_path / "whole.npz"),
                                str(tmp_path / "whole.npz"), extractor=ex,
                                num_samples=3)
  np.savez(tmp_path / "three.npz", images[:3])
  with pytest.raises(batching.NotEnoughImages, match=r"^3 reference images"):
    generation.evaluate_samples(str(tmp_path / "whole.npz"),
                                str(tmp_path / "three.npz"), extractor=ex)
  assert ex.calls == 0


# --- the generation-metrics pipeline --------------------------------------------------------

def test_features_are_read_back_one_batch_behind(tmp_path):
  """Batch i + 1 is on the devices before batch i's features are read back
  (and folded into the statistics): the same features as one call each."""
  events = []

  class Recording(metric_refs.FakeExtractor):
    def dispatch(self, images):
      i = sum(e[0] == "sent" for e in events)
      events.append(("sent", i))
      out = self(images)
      return lambda: events.append(("read", i)) or out

  samples = metric_refs.images(np.random.default_rng(6), 20)   # 4 batches of 6
  np.savez(tmp_path / "s.npz", samples)
  ex = Recording(batch_size=6)
  got = generation.run_features(ex, npz.open_images(str(tmp_path / "s.npz")),
                                "samples")
  assert events == [("sent", 0), ("sent", 1), ("read", 0), ("sent", 2),
                    ("read", 1), ("sent", 3), ("read", 2), ("read", 3)]
  np.testing.assert_array_equal(
      got["pool"], metric_refs.FakeExtractor(batch_size=20)(samples)["pool"])
  assert got["count"] == 20


def test_evaluate_samples_pipeline(tmp_path):
  rng = np.random.default_rng(5)
  samples = metric_refs.images(rng, 40)
  np.savez(tmp_path / "samples.npz", samples)
  np.savez(tmp_path / "same.npz", samples)            # images only: stats from them
  ex = metric_refs.FakeExtractor()
  same = generation.evaluate_samples(str(tmp_path / "samples.npz"),
                                      str(tmp_path / "same.npz"), extractor=ex,
                                      distance_dtype="float32")
  assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
  assert same["precision"] == 1.0 and same["recall"] == 1.0
  assert same["num_samples"] == 40 and same["num_reference"] == 40
  feats = ex(samples[:6])
  assert same["inception_score"] > 1.0

  # A shifted reference with stored ADM statistics of its own images.
  other = metric_refs.images(rng, 30, shift=60)
  out = [ex(other[i:i + 6]) for i in range(0, 30, 6)]
  cat = {k: np.concatenate([o[k] for o in out]) for k in feats}
  adm_reference.save_reference(
      str(tmp_path / "ref.npz"), images=other,
      **dict(zip(("mu", "sigma"), fid.feature_stats(cat["pool"]))),
      **dict(zip(("mu_s", "sigma_s"), fid.feature_stats(cat["spatial"]))))
  res = generation.evaluate_samples(str(tmp_path / "samples.npz"),
                                     str(tmp_path / "ref.npz"), extractor=ex,
                                     num_samples=33)
  with pytest.raises(npz.NpzContentError, match=r"ref.npz \(config.evaluate."
                     r"samples\) holds reference statistics .* swapped\?"):
    generation.evaluate_samples(str(tmp_path / "ref.npz"),
                                str(tmp_path / "samples.npz"), extractor=ex)
  assert res["num_samples"] == 33 and res["num_reference"] == 30
  assert res["fid"] > 1.0 and res["sfid"] > 0.5
  assert res["precision"] < 0.8
  logits33 = np.concatenate([ex(samples[i:min(i + 6, 33)])["logits"]
                             for i in range(0, 33, 6)])
  assert res["inception_score"] == pytest.approx(
      fid.inception_score(logits33), rel=1e-6)


def test_only_process_0_writes_the_report(tmp_path, monkeypatch, capsys):
  from genvis_jax.core import multihost
  from genvis_jax.evaluate import report
  monkeypatch.setattr(multihost.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost.jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost, "broadcast_strings", lambda s, size=0: s)
  report.write(str(tmp_path / "eval"), {"fid": 1.0}, "FID 1.0")
  assert not (tmp_path / "eval").exists()      # process 0 writes it
  # ... and says where on the console (its log line is each process's own).
  assert "[eval]" not in capsys.readouterr().out
  monkeypatch.setattr(multihost.jax, "process_index", lambda: 0)
  report.write(str(tmp_path / "eval"), {"fid": 1.0}, "FID 1.0")
  assert (f"[eval] FID 1.0 (in {tmp_path / 'eval' / 'metrics.json'})"
          in capsys.readouterr().out)


def test_untrained_inception_weights_are_a_caveat(tmp_path):
  """The README's runlocal FID uses a random-weight Inception: its record
  had no caveat, so 50,000 samples would have read as a publishable FID."""
  from genvis_jax.convert import inception as convert_inception
  from genvis_jax.models import inception as inception_model
  from tests import pipeline_common as pc
  params = convert_inception.load_inception_params(
      pc.write_random_inception(str(tmp_path / "inception.npz")))
  assert inception_model.untrained(params)
  trained = jax.tree_util.tree_map(lambda x: x, params)
  trained["Mixed_5b"]["branch1x1"]["bn"]["mean"] = np.full_like(
      trained["Mixed_5b"]["branch1x1"]["bn"]["mean"], 0.1)
  assert not inception_model.untrained(trained)
  rng = np.random.default_rng(6)
  np.savez(tmp_path / "s.npz", metric_refs.images(rng, 12))
  np.savez(tmp_path / "r.npz", metric_refs.images(rng, 12, shift=30))
  extractor = metric_refs.FakeExtractor()
  extractor.untrained = True
  res = generation.evaluate_samples(str(tmp_path / "s.npz"),
                                    str(tmp_path / "r.npz"),
                                    extractor=extractor)
  assert res["caveats"][0] == generation.UNTRAINED_NOTE
  assert "untrained" in generation.format_metrics(res)


def test_generation_driver_writes_metrics(tmp_path, monkeypatch, capsys):
  import ml_collections
  from genvis_jax.evaluate import driver
  rng = np.random.default_rng(6)
  np.savez(tmp_path / "s.npz", metric_refs.images(rng, 12))
  np.savez(tmp_path / "r.npz", metric_refs.images(rng, 12, shift=30))
  # The sampling run's record beside the samples names their weights.
  (tmp_path / "sample_parts").mkdir()
  (tmp_path / "sample_parts" / "settings.json").write_text(json.dumps(
      {"weights.generator": "step 20 committed 1796504306940177855",
       "init_from": "/run",
       "sample.cfg": 2.0}))
  monkeypatch.setattr(generation.convert_inception, "load_inception_params",
                      lambda path: {"path": path})
  monkeypatch.setattr(generation.inception_lib, "InceptionExtractor",
                      lambda params, **kw: metric_refs.FakeExtractor())
  config = ml_collections.ConfigDict(dict(evaluate=dict(
      kind="generation", samples=str(tmp_path / "s.npz"),
      reference=str(tmp_path / "r.npz"), inception="/weights", batch_size=6)))
  res = driver.run(config, str(tmp_path / "out"))
  saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]
  assert set(generation.METRICS) <= set(saved)
  assert saved["fid"] == pytest.approx(res["fid"])
  # What was scored: the files, all 12 of the file's images, the weights.
  assert saved["samples"] == str(tmp_path / "s.npz") and saved["inception"] == "/weights"
  assert saved["reference"] == str(tmp_path / "r.npz") and saved["samples_in_file"] == 12
  # Commit times as dates, as the sampling log prints them (not ns).
  assert saved["sampled_with"] == {
      "weights.generator": "step 20 committed 2026-12-05 20:58:26.940 UTC",
      "init_from": "/run"}
  printed = capsys.readouterr().out
  for word in ("FID", "sFID", "IS", "precision", "recall"):
    assert word in printed
  # 12 samples: the record and the line say the numbers are not comparable.
  assert saved["sample_size"] == [8, 8] and len(saved["caveats"]) == 1
  assert "only 12 samples" in saved["caveats"][0]
  assert "; NOT comparable: only 12 samples" in printed
  # Evaluated again into the same workdir: TensorBoard shows that one point,
  # as metrics.json holds that one result (not both runs' at step 0).
  import time   # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing import plugin_event_accumulator as pea  # pylint: disable=import-outside-toplevel
  time.sleep(1.0)
  driver.run(config, str(tmp_path / "out"))
  acc = pea.EventAccumulator(str(tmp_path / "out"), size_guidance={pea.TENSORS: 0})
  acc.Reload()
  assert [e.step for e in acc.Tensors("eval/fid")] == [0]
  config.evaluate.reference = ""
  with pytest.raises(ValueError, match="config.evaluate.reference"):
    driver.run(config, str(tmp_path / "out2"))


# --- tokenizer metrics -----------------------------------------------------------------------

def test_ssim_matches_skimage_and_is_range_independent():
  rng = np.random.default_rng(7)
  x = rng.uniform(0, 1, (3, 24, 20, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.15, x.shape), 0, 1).astype(np.float32)
  got = np.asarray(image_metrics.ssim(x, y))
  np.testing.assert_allclose(got, metric_refs.ssim(x, y), atol=2e-5)
  np.testing.assert_allclose(
      np.asarray(image_metrics.ssim(2 * x - 1, 2 * y - 1, (-1.0, 1.0))), got,
      atol=1e-5)
  np.testing.assert_allclose(np.asarray(image_metrics.ssim(x, x)), 1.0, atol=1e-5)
  # LlamaGen's call: skimage's defaults (7 x 7 mean, sample covariance) with
  # data_range=2 on [0, 1] images.
  recipe = dict(protocols.PROTOCOLS["fqgan"].ssim)
  llamagen = np.asarray(image_metrics.ssim(x, y, **recipe))
  from skimage.metrics import structural_similarity
  official = [structural_similarity(a, b, channel_axis=-1, data_range=2.0)
              for a, b in zip(x.astype(np.float64), y.astype(np.float64))]
  np.testing.assert_allclose(llamagen, official, atol=2e-5)
  assert np.all(np.abs(llamagen - got) > 1e-4)   # the recipes differ
  with pytest.raises(ValueError, match="window"):
    image_metrics.ssim(x[:, :8, :8], y[:, :8, :8])


def test_codebook_usage_single_and_factorized():
  codes = np.array([[0, 1, 1], [3, 3, 0]])
  assert image_metrics.codebook_usage(codes, 8) == {
      "codebook_usage": 3 / 8, "codes_used": 3,
      "codebook_entropy": pytest.approx(metric_refs.codebook_entropy(codes, 8),
                                        rel=1e-12)}
  # Counts summed over batches are the whole set's.
  halves = image_metrics.add_counts(image_metrics.code_counts([codes[:1]]),
                                    image_metrics.code_counts([codes[1:]]))
  assert image_metrics.codebook_stats(halves, 8, factorized=False) == (
      image_metrics.codebook_usage(codes, 8))
  fq = (np.array([[0, 1], [2, 3]]), np.array([[5, 5], [5, 5]]))
  u = image_metrics.codebook_usage(fq, 16)
  assert u["codebook_usage_0"] == 4 / 16 and u["codebook_usage_1"] == 1 / 16
  assert u["codes_used_0"] == 4 and u["codes_used_1"] == 1
  assert u["codebook_usage"] == pytest.approx(5 / 32)
  assert image_metrics.codebook_usage(fq, (4, 2))["codebook_usage"] == pytest.approx(0.75)
  with pytest.raises(ValueError, match="codebook sizes"):
    image_metrics.codebook_usage(fq, (4, 2, 2))


def _torch_fidelity_isc(logits, splits=10, seed=2020):
  """torch-fidelity's isc_features_to_metric (its defaults), in NumPy."""
  n = len(logits)
  x = np.asarray(logits, np.float64)[np.random.RandomState(seed).permutation(n)]
  logp = x - x.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  p = np.exp(logp)
  scores = []
  for i in range(splits):
    pc, lpc = p[i * n // splits:(i + 1) * n // splits], logp[
        i * n // splits:(i + 1) * n // splits]
    kl = (pc * (lpc - np.log(pc.mean(0, keepdims=True)))).sum(1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores))


def test_torch_fidelity_inception_score_shuffles_then_splits():
  """The Equivariant repository's IS: torch-fidelity permutes the rows
  (RandomState(2020)) before its 10 splits; ADM's takes them in order."""
  logits = np.random.default_rng(3).normal(size=(103, 9)) * 3
  logits[:50] += np.eye(9)[0] * 8   # class-sorted rows: the splits differ
  got = fid.inception_score_shuffled(logits)
  assert got == pytest.approx(_torch_fidelity_isc(logits), rel=1e-12)
  assert got != pytest.approx(fid.inception_score(logits, 11), rel=1e-3)
  with pytest.raises(ValueError, match=r"N >= 10"):
    fid.inception_score_shuffled(logits[:9])
