"""Generation metrics with the ADM protocol: FID, sFID, IS, precision, recall.

``evaluate_samples`` reads a samples ``.npz`` (``arr_0`` uint8 (N, H, W, 3),
what ``genvis_jax.sample`` writes; papers use N = 50,000) and an ADM reference
batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``), runs the FID Inception over
both in batches split across the local devices, and compares them like
openai/guided-diffusion's ``evaluations/evaluator.py``:
  FID        pool features: samples' stats vs the reference's stored mu/sigma
  sFID       spatial features: samples' stats vs the stored mu_s/sigma_s
  IS         samples' logits, 5000-sample splits (torch-fidelity's shuffled
             10 splits with ``inception_score="torch_fidelity"``)
  precision, recall   k=3 manifolds of sample vs reference pool features
(reference stats come from its images when the file has no mu/sigma; a file
of mu and sigma alone, torch-fidelity's, gives FID and IS only).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax.evaluate import adm_reference as ref_lib
from genvis_jax.evaluate import batching
from genvis_jax.evaluate import fid as fid_lib
from genvis_jax.convert import inception as convert_inception
from genvis_jax.core import metrics as metrics_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.evaluate import inception as inception_lib
from genvis_jax.evaluate import npz
from genvis_jax.evaluate import report

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def run_features(extractor, images: npz.NpzArray, what: str, *,
                 limit: int | None = None, keep_logits: bool = True,
                 log_every: int = 20,
                 setting: str = "config.evaluate.num_samples") -> dict:
  """Streams exactly ``limit`` images (None / 0 = all) through ``extractor``.

  Every batch but the last is full; the extractor pads the last one and only
  its real rows reach the statistics. ``limit`` above the file's count raises
  ``batching.NotEnoughImages`` naming both counts and ``setting``.

  Returns {"pool": (N, 2048) float32, "logits": (N, 1008) float32 or None,
  "pool_stats", "spatial_stats": StreamingStats, "count": N}. Raises
  ``RuntimeError`` when the extractor does not return one row per image.
  """
  n = batching.check_count(limit, len(images), f"{images.path}:{images.key}",
                           setting)
  pool_stats, spatial_stats = fid_lib.StreamingStats(), fid_lib.StreamingStats()
  pools, logits = [], []
  progress = batching.ProgressLog(what, n, log_every)
  for batch, out in inception_lib.pipelined(
      extractor, images.batches(extractor.batch_size, n)):
    pool_stats.update(out["pool"])
    spatial_stats.update(out["spatial"])
    pools.append(out["pool"])
    if keep_logits:
      logits.append(out["logits"])
    progress(len(batch))
  if pool_stats.count != n:   # the extractor must return one row per image
    raise RuntimeError(f"{what}: features of {pool_stats.count} images, "
                       f"expected {n}.")
  return {"pool": np.concatenate(pools),
          "logits": np.concatenate(logits) if keep_logits else None,
          "pool_stats": pool_stats, "spatial_stats": spatial_stats, "count": n}


def _reference_features(extractor, ref: ref_lib.Reference, log_every: int):
  """Pool features of the reference images (stored ones if they were made the
  way the samples are measured) and the reference statistics
  ((mu, sigma), (mu_s, sigma_s)); for a file of mu and sigma alone
  (``fid_only``) without images, (None, (mu, sigma), None). Call after
  ``resolve_preprocess`` / ``check_inception_weights`` accepted the pair."""
  if ref.images is None:
    return None, (ref.mu, ref.sigma), None
  stored = ref.pool_features
  usable = (stored is not None and len(stored) == len(ref.images)
            and ref.has_stats
            and ref.origin == "recorded")
  if usable:
    logging.info("reference: using %d stored pool features", len(stored))
    feats = stored
  else:
    out = run_features(extractor, ref.images, "reference", keep_logits=False,
                       log_every=log_every)
    feats = out["pool"]
    if ref.mu is None:
      logging.info("reference: no stored mu/sigma, using its %d images",
                   out["count"])
      return feats, out["pool_stats"].result(), out["spatial_stats"].result()
  return feats, (ref.mu, ref.sigma), (
      (ref.mu_s, ref.sigma_s) if ref.has_stats else None)


def evaluate_samples(samples_npz: str, reference_npz: str,
                     inception_params=None, *, extractor=None,
                     batch_size: int = 200, num_samples: int | None = None,
                     preprocess: str = ref_lib.AUTO, mesh=None,
                     is_split_size: int = fid_lib.ADM_IS_SPLIT_SIZE,
                     nearest_k: int = 3,
                     distance_dtype: str = "float16",
                     inception_score: str = "adm",
                     log_every: int = 20) -> dict:
  """FID, sFID, IS, precision and recall of samples against a reference.

  Args:
    samples_npz: ``arr_0`` uint8 (N, H, W, 3).
    reference_npz: ADM reference batch (see ``adm_reference.py``).
    inception_params: FID Inception params (``load_inception_params``).
    batch_size: images per step over all local devices (any value: the last
      batch is padded and masked).
    num_samples: evaluate exactly the first ``num_samples`` (None / 0 = all;
      more than the file holds is an error).
    preprocess: "auto" (follow the reference, see
      ``adm_reference.resolve_preprocess``), "pytorch_fid" or "adm_tf"; a value
      contradicting the reference's record raises ``ProtocolMismatch``.
    mesh: 1-D ``("data",)`` mesh; default all local devices.
    extractor: replaces the Inception (then ``inception_params`` is unused):
      any object with ``batch_size``, ``mesh`` and ``__call__(uint8 images)
      -> {"pool", "spatial", "logits"}`` like ``InceptionExtractor``;
      optional ``preprocess`` / ``weights_id`` attributes are checked against
      the reference.
    inception_score: "adm" (consecutive ``is_split_size`` splits, ADM's
      evaluator) or "torch_fidelity" (``fid.inception_score_shuffled``).
  Returns:
    {"fid", "sfid" (clamped at 0), "inception_score", "precision", "recall"
     (floats; sfid, precision and recall None against a file of mu and sigma
     alone, listed in "not_computed"), "num_samples", "num_reference" (ints;
     the latter None without reference images), "preprocess",
     "inception_score_protocol" (str), "sample_size" ([H, W]), "caveats"
     (list of str, ``warn_incomparable``)}.
  Raises:
    npz.NpzFileError / npz.NpzContentError: a missing or unreadable file,
      samples that are not uint8 (N, H, W, 3) or hold reference statistics,
      a reference without images or with statistics of other feature sizes
      than the extractor's ``feature_dims`` (if it has them).
    adm_reference.ProtocolMismatch: a preprocess or Inception weights that
      contradict the reference's record.
    batching.NotEnoughImages: ``num_samples`` above the file's count; at
      most ``nearest_k`` samples or reference images (checked before any
      image is measured).
    ValueError: neither ``inception_params`` nor ``extractor``, or an
      unknown ``inception_score``.
  """
  fid_lib.check_distance_dtype(distance_dtype)
  if inception_score not in fid_lib.IS_PROTOCOLS:
    raise errors.ConfigError(
        f"config.evaluate.inception_score={inception_score!r}; one of "
        f"{fid_lib.IS_PROTOCOLS} (ADM's evaluator; torch-fidelity's, the "
        "Equivariant repository's).")
  # Before its images: a reference may hold none.
  with npz.open_npz(samples_npz, "config.evaluate.samples") as d:
    if set(ref_lib.STAT_KEYS) & set(d.files):
      raise npz.NpzContentError(
          f"{samples_npz} (config.evaluate.samples) holds reference statistics "
          f"({sorted(set(ref_lib.STAT_KEYS) & set(d.files))}): it is a "
          "reference batch. Are config.evaluate.samples and "
          "config.evaluate.reference swapped?")
  samples = npz.open_images(samples_npz, setting="config.evaluate.samples")
  ref = ref_lib.load_reference(reference_npz)
  if ref.images is None and not ref.fid_only:   # before any feature
    raise npz.NpzContentError(
        f"{reference_npz} (config.evaluate.reference) has statistics but no "
        "images ('arr_0'): precision and recall need the reference images. "
        "Use ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), "
        "which holds both, or one written by --config.evaluate.kind=reference.")
  logging.info("reference %s", ref_lib.describe(ref))
  setting = "config.evaluate.preprocess"
  if preprocess in (None, "", ref_lib.AUTO) and hasattr(extractor,
                                                        "preprocess"):
    preprocess, setting = extractor.preprocess, "the extractor's preprocess"
  chosen = ref_lib.resolve_preprocess(ref, preprocess, setting)
  if extractor is None:
    if inception_params is None:
      raise ValueError("evaluate_samples needs inception_params (see "
                       "convert.inception.load_inception_params) or an extractor.")
    extractor = inception_lib.InceptionExtractor(
        inception_params, batch_size=batch_size, mesh=mesh, preprocess=chosen)
  elif getattr(extractor, "preprocess", chosen) != chosen:
    raise ref_lib.ProtocolMismatch(
        f"The extractor preprocesses with {extractor.preprocess!r} but the "
        f"reference {reference_npz} needs {chosen!r}; build the extractor with "
        f"preprocess={chosen!r}.")
  if ref.inception_weights is not None:   # fingerprinting hashes ~95 MB
    ref_lib.check_inception_weights(ref, getattr(extractor, "weights_id",
                                                 None))
  ref_lib.check_feature_dims(ref, getattr(extractor, "feature_dims", None),
                             reference_npz)
  _check_neighbours(samples, num_samples, ref, nearest_k)
  logging.info("Inception preprocess %s", chosen)
  sam = run_features(extractor, samples, "samples", limit=num_samples,
                     log_every=log_every)
  ref_feats, ref_pool, ref_spatial = _reference_features(extractor, ref,
                                                         log_every)
  caveats = warn_incomparable(sam["count"], samples.shape,
                              None if ref.images is None else ref.images.shape,
                              untrained=getattr(extractor, "untrained", False),
                              spatial=ref_spatial is not None)
  not_computed = ([] if ref_spatial is not None else ["sfid"]) + (
      [] if ref_feats is not None else ["precision", "recall"])
  if not_computed:
    logging.info("%s holds mu and sigma alone: FID and IS only, no %s.",
                 reference_npz, ", ".join(not_computed))
  logging.info("computing %s", " / ".join(
      name for key, name in (("fid", "FID"), ("sfid", "sFID"), ("is", "IS"),
                             ("precision", "precision"), ("recall", "recall"))
      if key not in not_computed))
  precision = recall = None
  if ref_feats is not None:
    precision, recall = fid_lib.precision_recall(
        ref_feats, sam["pool"], nearest_k, distance_dtype=distance_dtype,
        mesh=extractor.mesh)
  return {
      "fid": fid_lib.frechet_distance(*sam["pool_stats"].result(), *ref_pool),
      "sfid": None if ref_spatial is None else fid_lib.frechet_distance(
          *sam["spatial_stats"].result(), *ref_spatial, name="sFID"),
      "inception_score": (
          fid_lib.inception_score(sam["logits"], is_split_size)
          if inception_score == "adm" else
          fid_lib.inception_score_shuffled(sam["logits"])),
      "precision": precision,
      "recall": recall,
      "not_computed": not_computed,
      "num_samples": int(sam["count"]),
      "samples_in_file": int(samples.shape[0]),
      "num_reference": None if ref_feats is None else int(len(ref_feats)),
      "inception_weights": getattr(extractor, "weights_id", None),
      "preprocess": chosen,
      "inception_score_protocol": inception_score,
      "sample_size": [int(d) for d in samples.shape[1:3]],
      # Why the numbers are not comparable with published ones ([] if they
      # are): in the record itself, not only in the log.
      "caveats": caveats,
  }


def _check_neighbours(samples: npz.NpzArray, num_samples, ref, k: int) -> None:
  """Raises ``batching.NotEnoughImages`` before any image is measured when
  the samples or the reference images are too few for precision / recall
  (each image's k-th nearest neighbour among the others of its set)."""
  n = batching.check_count(num_samples, len(samples),
                           f"{samples.path}:{samples.key}",
                           "config.evaluate.num_samples")
  for count, what, fix in (
      (n, "samples", "evaluate more (config.evaluate.num_samples, or sample "
       "more with config.sample.num_samples)"),
      (math.inf if ref.images is None else len(ref.images),
       "reference images", "use a larger reference")):
    if count <= k:
      raise batching.NotEnoughImages(
          f"{count} {what}: precision and recall measure each image against "
          f"its {k} nearest neighbours in its set, so they need at least "
          f"{k + 1} (and FID thousands: the papers use 50,000 samples); "
          f"{fix}.")


MIN_COMPARABLE = fid_lib.FEATURE_DIM


UNTRAINED_NOTE = (
    "the Inception weights are untrained (every batch-norm statistic at 0 / "
    "1, as write_random_inception's): the numbers only exercise the "
    "pipeline; measure with pytorch-fid's pt_inception-2015-12-05-6726825d.pth")


def warn_incomparable(count: int, sample_shape, reference_shape=None, *,
                      untrained: bool = False,
                      spatial: bool = True) -> list[str]:
  """Logs (and returns) why these numbers are not comparable with published
  ones: random stand-in Inception weights (``untrained``), fewer samples
  than feature dimensions (FID ~0 on tiny sets means nothing; ``spatial``:
  whether sFID was computed too), or samples and reference images of
  different sizes."""
  notes = [UNTRAINED_NOTE] if untrained else []
  if count < MIN_COMPARABLE:
    notes.append(f"only {count} samples: with fewer than {MIN_COMPARABLE} the "
                 f"feature covariance is rank-deficient, so "
                 f"{'FID / sFID are' if spatial else 'FID is'} not "
                 "comparable with published numbers (use 50,000)")
  if reference_shape is not None and tuple(sample_shape[1:3]) != tuple(
      reference_shape[1:3]):
    notes.append(f"samples are {sample_shape[1]}x{sample_shape[2]} but the "
                 f"reference images {reference_shape[1]}x{reference_shape[2]}: "
                 "both are resized to the Inception input, but the numbers "
                 "compare different image sizes")
  for note in notes:
    logging.warning("Generation metrics: %s.", note)
  return notes


def format_metrics(m: dict) -> str:
  """One line of ``evaluate_samples``' results, with its caveats."""
  caveats = m.get("caveats") or []
  num = lambda k, f: "n/a" if m.get(k) is None else format(m[k], f)
  against = ("FID statistics" if m.get("num_reference") is None else
             f"{m['num_reference']} reference images")
  return (f"FID {m['fid']:.3f}  sFID {num('sfid', '.3f')}  IS "
          f"{m['inception_score']:.2f}  precision {num('precision', '.4f')}  "
          f"recall {num('recall', '.4f')}  ({m['num_samples']} samples vs "
          f"{against}"
          f"{', preprocess ' + m['preprocess'] if 'preprocess' in m else ''})"
          + "".join(f"; NOT comparable: {c}" for c in caveats))


def sampled_with(samples_npz: str) -> dict:
  """The generator / tokenizer weights (``weights.*``) and paths the
  sampling run beside ``samples_npz`` recorded (its
  ``sample_parts/settings.json``), commit times as dates
  (``weights.readable``); {} for samples from elsewhere."""
  # Here, not at the top: sample.parts imports the token files' readers
  # (array_record), which a GPU machine that only evaluates may lack.
  from genvis_jax.sample import parts  # pylint: disable=import-outside-toplevel
  path = epath.Path(parts.directory(os.path.dirname(samples_npz))) / (
      parts.SETTINGS_FILE)
  try:
    recorded = json.loads(path.read_text())
  except (OSError, ValueError):   # none (samples from elsewhere) or damaged
    return {}
  return {k: weights_lib.readable(v) if k.startswith("weights.") else v
          for k, v in recorded.items()
          if k.startswith("weights.") or k in ("init_from",
                                               "tokenizer.checkpoint")}


# The fix for each unset config.evaluate path.
_UNSET_HOWTO = {
    "samples": npz.samples_howto(),
    "reference": ("set --config.evaluate.reference to ADM's reference batch "
                  "(e.g. VIRTUAL_imagenet256_labeled.npz), or for other data "
                  "to the reference.npz --config.evaluate.kind=reference "
                  "writes"),
    "inception": convert_inception.setting_howto(),
}


def check_config(config, workdir: str | None = None) -> None:
  """Raises ``ConfigError`` when samples, reference or inception is unset
  (before any file is read; a runner of several jobs checks each first)."""
  del workdir
  ev = config.evaluate
  missing = [f"config.evaluate.{key}" for key in
             ("samples", "reference", "inception") if not ev.get(key)]
  if missing:
    raise errors.ConfigError(
        f"{', '.join(missing[:-1])}{' and ' if len(missing) > 1 else ''}"
        f"{missing[-1]} {'is' if len(missing) == 1 else 'are'} not "
        "set: generation metrics need samples (npz), reference (ADM npz) and "
        "inception (converted weights) paths: "
        + "; ".join(_UNSET_HOWTO[m.rsplit(".", 1)[1]] for m in missing) + ".")


def evaluate(config, workdir: str) -> dict:
  """``config.evaluate.kind == "generation"``.

  Reads ``config.evaluate``: samples (npz), reference (npz), inception (params
  dir or npz), batch_size, and optionally num_samples, preprocess ("auto":
  follow the reference), distance_dtype. Writes ``workdir/metrics.json`` and
  TensorBoard scalars; returns ``evaluate_samples``' dict. Raises
  ``ConfigError`` when samples, reference or inception is unset, and what
  ``evaluate_samples`` raises.
  """
  check_config(config)
  ev = config.evaluate
  params = convert_inception.load_inception_params(ev.inception)
  results = evaluate_samples(
      ev.samples, ev.reference, params, batch_size=ev.get("batch_size", 200),
      num_samples=ev.get("num_samples", None) or None,
      preprocess=ev.get("preprocess", ref_lib.AUTO),
      distance_dtype=ev.get("distance_dtype", "float16"),
      inception_score=ev.get("inception_score", "adm"))
  # What was scored, with the weights the samples' run recorded drawing them.
  results.update(samples=ev.samples, reference=ev.reference,
                 inception=ev.inception,
                 sampled_with=sampled_with(ev.samples))
  report.write(workdir, results, format_metrics(results))
  # A re-run into this workdir replaces metrics.json: its TensorBoard points
  # replace the earlier run's too (a restart at step 0), not sit beside them.
  metrics_lib.mark_start(workdir, -1)
  writer = metrics_lib.create_writer(workdir)
  writer.write_scalars(0, {f"eval/{k}": results[k] for k in METRICS
                           if results[k] is not None})
  writer.flush()
  return results
