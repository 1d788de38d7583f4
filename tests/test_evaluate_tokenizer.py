"""Tokenizer evaluation (``config.evaluate.kind = "tokenizer"``): PSNR, MSE,
SSIM, LPIPS, per-map codebook usage and rFID over exact image counts at batch
sizes that do and do not divide the count, unreadable files skipped, and
codes computed in fp32 whatever dtype the tokenizer trains in."""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genvis_jax.errors import UserError
from genvis_jax.evaluate import batching, protocols, tokenizer
from tests import metric_refs


ENCODED_SHARDINGS = []   # FakeTokenizer.encode's input shardings, as traced


class FakeTokenizer(nn.Module):
  """4x4-patch grey-level codes 1..16 (an all-zero image -> code 0, so padding
  that leaks into a metric shows), and a second map (factorized usage)."""
  value_range = (0.0, 1.0)
  dtype: str = "float32"

  def encode(self, x):
    jax.debug.inspect_array_sharding(x, callback=ENCODED_SHARDINGS.append)
    b, h, w, _ = x.shape
    g = x.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4, 5))
    codes = jnp.clip(jnp.floor(g * 16), 0, 15).astype(jnp.int32) + 1
    codes = jnp.where(jnp.all(x == 0, axis=(1, 2, 3))[:, None, None], 0, codes)
    return codes, codes % 3

  def decode(self, codes):
    v = jnp.where(codes[0] == 0, 0.0, (codes[0] - 0.5) / 16)
    v = jnp.repeat(jnp.repeat(v, 4, 1), 4, 2)[..., None]
    return jnp.repeat(v, 3, -1).astype(self.dtype)


class SignedFakeTokenizer(FakeTokenizer):
  """FakeTokenizer on [-1, 1] pixels (LlamaGen, FQGAN, Equivariant)."""
  value_range = (-1.0, 1.0)

  def encode(self, x):
    return super().encode((x + 1) / 2)

  def decode(self, codes):
    return (2 * super().decode(codes) - 1).astype(self.dtype)


def _numpy_tokenizer(x):
  b, h, w, _ = x.shape
  g = x.astype(np.float64).reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4, 5))
  c = np.clip(np.floor(g * 16), 0, 15).astype(int) + 1
  y = np.repeat(np.repeat((c - 0.5) / 16, 4, 1), 4, 2)[..., None].repeat(3, -1)
  return c, y


@pytest.fixture
def tok_config(monkeypatch):
  from configs import base
  built = []

  def build(cfg):
    built.append(cfg)
    cls = SignedFakeTokenizer if cfg.get("signed", False) else FakeTokenizer
    return cls(dtype=cfg.dtype)
  monkeypatch.setattr(tokenizer.models, "build", build)
  monkeypatch.setattr(tokenizer.models, "load_params",
                      lambda cfg, path, mesh=None, **kw: {})
  monkeypatch.setattr(tokenizer.convert_lpips, "load_lpips_params",
                      lambda path: {})
  monkeypatch.setattr(tokenizer.lpips_lib, "lpips_distance", lambda p, a, b, value_range: (
      jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))))
  monkeypatch.setattr(tokenizer.convert_inception, "load_inception_params",
                      lambda path: {})
  import types
  from genvis_jax.data import transforms
  # The Inception resize each extractor was built with, the centre crop each
  # image went through.
  seen = types.SimpleNamespace(resizes=[], crops=[])

  def spy(method):
    crop = transforms.CENTER_CROPS[method]
    return lambda *a: (seen.crops.append(method), crop(*a))[1]
  for m in list(transforms.CENTER_CROPS):
    monkeypatch.setitem(transforms.CENTER_CROPS, m, spy(m))

  def extractor(params, batch_size, preprocess):
    seen.resizes.append(preprocess)
    return metric_refs.FakeExtractor(batch_size)
  monkeypatch.setattr(tokenizer.inception_lib, "InceptionExtractor", extractor)
  c = base.get_config()
  c.model = ml_collections.ConfigDict(dict(
      name="fake", dtype="bfloat16", param_dtype="float32", num_codes=(32, 3),
      signed=False))
  c.data.image_size = 32
  c.data.num_classes = 10
  c.data.num_examples = 20
  c.data.random_flip = False
  c.evaluate.update(dict(kind="tokenizer", checkpoint="/ckpt", num_images=13,
                         lpips_path="/lpips.npz", inception="/inception",
                         protocol="maskgit_vqgan"))
  return c, built, seen


def _spy_pipeline(monkeypatch):
  """Records "sent" as each batch leaves the data, "scored" as the host reads
  one back, and the shardings of each batch's SSIM and LPIPS arrays."""
  events, shardings = [], []
  batches, add = tokenizer.batching.exact_batches, tokenizer._Scores.add

  def sent(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      events.append("sent")
      yield batch

  def scored(self, *args):
    events.append("scored")
    add(self, *args)
    shardings.extend(a.sharding for a in self.on_device[-1][1:])
  monkeypatch.setattr(tokenizer.batching, "exact_batches", sent)
  monkeypatch.setattr(tokenizer._Scores, "add", scored)
  return events, shardings


@pytest.mark.parametrize("batch", [4, 13])
def test_tokenizer_eval_covers_exact_count(tok_config, tmp_path, batch,
                                           caplog, monkeypatch):
  import logging  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import DemoSource
  from genvis_jax.core import pixels
  config, built, seen = tok_config
  config.evaluate.batch_size = batch
  ENCODED_SHARDINGS.clear()
  events, shardings = _spy_pipeline(monkeypatch)
  with caplog.at_level(logging.WARNING, logger="absl"):
    res = tokenizer.evaluate(config, str(tmp_path))
  # 13 images: an rFID not comparable with published ones, and said so.
  assert "rFID of only 13 images" in caplog.text
  # Each batch is split over the 8 devices (4 images -> 8 rows, 13 -> 16),
  # and so are its per-image SSIM and LPIPS, computed there.
  assert ENCODED_SHARDINGS and all(
      len(sh.device_set) == 8 and not sh.is_fully_replicated
      for sh in ENCODED_SHARDINGS + shardings)
  # Batch i + 1 goes to the devices before batch i is read back.
  batches = -(-13 // (-(-batch // 8) * 8))   # batches of 8 or 16 rows
  assert len(shardings) == 2 * batches
  assert events == ["sent"] + ["sent", "scored"] * (batches - 1) + ["scored"]
  # The tokenizer computed in float32 although config.model says bfloat16.
  assert built[-1].dtype == "float32" and config.model.dtype == "bfloat16"
  assert res["dtype"] == "float32"
  src = DemoSource("validation", num_examples=20)
  x = np.stack([src[i]["image"] for i in range(13)]).astype(np.float32) / 255
  codes, y = _numpy_tokenizer(x)
  mse = np.mean(np.square(x - y), axis=(1, 2, 3))
  assert res["num_images"] == 13
  assert res["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)
  assert res["mse"] == pytest.approx(np.mean(mse), rel=1e-5)
  assert res["ssim"] == pytest.approx(np.mean(metric_refs.ssim(x, y)), abs=2e-5)
  assert res["lpips"] == pytest.approx(np.mean(np.abs(x - y)), rel=1e-5)
  assert res["codes_used_0"] == np.unique(codes).size
  assert res["codebook_usage_0"] == pytest.approx(np.unique(codes).size / 32)
  assert res["codes_used_1"] == np.unique(codes % 3).size
  fx = metric_refs.FakeExtractor(13)(pixels.to_uint8(x, (0.0, 1.0), "round"))["pool"]
  fy = metric_refs.FakeExtractor(13)(pixels.to_uint8(y, (0.0, 1.0), "round"))["pool"]
  assert res["rfid"] == pytest.approx(
      metric_refs.frechet_formula(*metric_refs.feature_stats(fx), *metric_refs.feature_stats(fy)), rel=1e-6, abs=1e-9)
  # 1d-tokenizer's evaluator also reports the reconstructions' IS and the
  # code frequencies' entropy.
  ly = metric_refs.FakeExtractor(13)(pixels.to_uint8(y, (0.0, 1.0), "round"))["logits"]
  assert res["inception_score"] == pytest.approx(
      metric_refs.tokenizer_inception_score(ly), rel=1e-6)
  assert res["codebook_entropy_0"] == pytest.approx(
      metric_refs.codebook_entropy(codes, 32), rel=1e-9)
  assert res["protocol"] == "maskgit_vqgan" and res["center_crop"] == "torchvision"
  assert len(seen.crops) >= 13 and set(seen.crops) == {"torchvision"}
  assert res["rfid_preprocess"] == seen.resizes[-1] == "adm_tf"
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["num_images"] == 13 and (tmp_path / "reconstructions.png").exists()
  # The record says why its rFID is not comparable, and what was scored.
  assert len(saved["caveats"]) == 1 and saved["caveats"][0].startswith(
      "rFID of only 13 images")
  assert saved["checkpoint"] == config.evaluate.checkpoint



def _batch_pair_distance(p, a, b, value_range):
  """Stands in for LPIPS's layout: both images through one network along the
  batch (concatenated), then compared pairwise."""
  del value_range
  n = len(a)
  f = jnp.tanh(jnp.concatenate([a, b]) @ p["w"])
  return jnp.mean(jnp.square(f[:n] - f[n:]), axis=(1, 2, 3))


@pytest.mark.parametrize("protocol", ["maskgit_vqgan", "fqgan"])
def test_ssim_and_lpips_run_on_each_devices_own_rows(protocol, monkeypatch):
  """A batch split over the 8 devices gets its per-image SSIM (the protocol's
  recipe) and LPIPS split the same way, each device's values those of the
  program on its rows alone; against the whole batch on one device (the
  former path) only float32 summation order can differ."""
  from genvis_jax.core import sharding
  from genvis_jax.evaluate import image_metrics
  params = {"w": np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)}
  monkeypatch.setattr(tokenizer.convert_lpips, "load_lpips_params",
                      lambda path: params)
  monkeypatch.setattr(tokenizer.lpips_lib, "lpips_distance",
                      _batch_pair_distance)
  mesh = sharding.data_mesh(jax.devices())
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (16, 16, 16, 3)).astype(np.float32)
  y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
  ssim = lambda a, b: image_metrics.ssim(
      a, b, **protocols.PROTOCOLS[protocol].ssim)
  lpips = jax.jit(lambda a, b: _batch_pair_distance(params, a, b, None))
  for sharded, fn in (
      (tokenizer._on_own_rows(ssim, mesh, 0, 2)(x, y), jax.jit(ssim)),
      (tokenizer._lpips_fn("/lpips.npz", (0.0, 1.0), mesh)(x, y), lpips)):
    assert sharded.sharding == sharding.batch_sharding(mesh)
    assert len(sharded.sharding.device_set) == 8
    rows = np.concatenate([fn(x[i:i + 2], y[i:i + 2]) for i in range(0, 16, 2)])
    np.testing.assert_array_equal(np.asarray(sharded), rows)
    np.testing.assert_allclose(np.asarray(sharded), fn(x, y), rtol=2e-6)

def _official_llamagen_bytes(x):
  """LlamaGen: ``clamp(127.5 x + 128, 0, 255).to(uint8)`` of [-1, 1] images."""
  y = np.float32(127.5) * np.asarray(x, np.float32) + np.float32(128)
  return np.clip(y, 0, 255).astype(np.uint8)


def _official_equivariant_bytes(x):
  """Equivariant: ``round(clip((x + 1) / 2 * 255, 0, 255))`` of [-1, 1] images."""
  x = (np.asarray(x, np.float32) + np.float32(1)) / np.float32(2)
  return np.round(np.clip(x * np.float32(255), 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("protocol", ["fqgan", "eq_tokenizer"])
def test_signed_tokenizers_are_scored_by_their_protocol(tok_config, tmp_path,
                                                        protocol):
  """[-1, 1] tokenizers. FQGAN (reconstruction_vq_ddp.py): PSNR / SSIM of the
  reconstruction's bytes / 255 against the [0, 1] original with skimage (SSIM
  with data_range=2), rFID of both sides' bytes (val_ddp.py writes the
  originals' the same way) with the TF-style Inception resize. Equivariant:
  its sampler's rounded bytes for rFID, float PSNR / Gaussian SSIM."""
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity
  from genvis_jax.data import DemoSource
  config, _, seen = tok_config
  config.model.signed = True
  config.evaluate.update(dict(protocol=protocol, batch_size=4))
  res = tokenizer.evaluate(config, str(tmp_path))
  src = DemoSource("validation", num_examples=20)
  u = np.stack([src[i]["image"] for i in range(13)])
  x01 = u.astype(np.float32) / np.float32(255)
  x = (x01 - np.float32(0.5)) / np.float32(0.5)     # Normalize(0.5, 0.5)
  _, y01 = _numpy_tokenizer(x01)
  y = (2 * y01 - 1).astype(np.float32)
  gt = (x + np.float32(1)) / np.float32(2)          # (rgb_gt + 1) / 2
  if protocol == "fqgan":
    to_bytes = _official_llamagen_bytes
    restored = to_bytes(y).astype(np.float32) / 255
    psnr = [peak_signal_noise_ratio(a, b) for a, b in zip(restored, gt)]
    ssim = [structural_similarity(a, b, data_range=2.0, channel_axis=-1)
            for a, b in zip(restored, gt)]
    mse = np.mean(np.square(2 * restored - 1 - x))
    float_psnr = np.mean(10 * np.log10(1 / np.mean(np.square(gt - y01),
                                                   (1, 2, 3))))
    assert abs(res["psnr"] - float_psnr) > 1e-3   # the bytes were scored
  else:
    to_bytes = _official_equivariant_bytes
    psnr = 10 * np.log10(1 / np.mean(np.square(gt - y01), (1, 2, 3)))
    ssim = metric_refs.ssim(gt, y01)
    mse = np.mean(np.square(x - y))
  crop = "adm" if protocol == "fqgan" else "albumentations"
  assert res["protocol"] == protocol and res["center_crop"] == crop
  assert res["scored"] == ("bytes" if protocol == "fqgan" else "float")
  assert res["psnr"] == pytest.approx(np.mean(psnr), rel=1e-5)
  assert res["ssim"] == pytest.approx(np.mean(ssim), abs=2e-5)
  assert res["mse"] == pytest.approx(mse, rel=1e-5)   # in [-1, 1] units
  np.testing.assert_array_equal(to_bytes(x), u)      # originals: their bytes
  fx = metric_refs.FakeExtractor(13)(to_bytes(x))["pool"]
  fy = metric_refs.FakeExtractor(13)(to_bytes(y))["pool"]
  assert res["rfid"] == pytest.approx(
      metric_refs.frechet_formula(*metric_refs.feature_stats(fx), *metric_refs.feature_stats(fy)), rel=1e-6, abs=1e-9)
  assert res["rfid_preprocess"] == seen.resizes[-1] == "adm_tf"
  assert set(seen.crops) == {crop}
  # ADM's evaluator scores LlamaGen / FQGAN's npz of reconstructions; the
  # Equivariant code has no tokenizer evaluation to take an IS from.
  ly = metric_refs.FakeExtractor(13)(to_bytes(y))["logits"].astype(np.float64)
  if protocol == "fqgan":
    assert res["inception_score"] == pytest.approx(
        metric_refs.inception_score(ly, 5000), rel=1e-6)
  else:
    assert "inception_score" not in res
  # An explicit resize or crop wins over the protocol's.
  config.evaluate.preprocess = "pytorch_fid"
  config.data.center_crop = "torchvision"
  seen.crops.clear()
  res = tokenizer.evaluate(config, str(tmp_path))
  assert seen.resizes[-1] == "pytorch_fid" and res["center_crop"] == "torchvision"
  assert set(seen.crops) == {"torchvision"}


def test_each_paper_tokenizer_has_its_protocol(tok_config, tmp_path):
  config, _, _ = tok_config
  from configs import eq_tokenizer, fqgan_dual_ds16, maskgit_vqgan, vq_ds16
  want = {"maskgit_vqgan": ("round", "torchvision", "float"),
          "llamagen_vq": ("llamagen", "adm", "bytes"),
          "fqgan": ("llamagen", "adm", "bytes"),
          "eq_tokenizer": ("round", "albumentations", "float")}
  for mod in (eq_tokenizer, fqgan_dual_ds16, maskgit_vqgan, vq_ds16):
    config.model.name, config.evaluate.protocol = mod.get_config().model.name, ""
    name, p = protocols.protocol(config)
    assert name == config.model.name
    assert (p.to_uint8, p.crop, p.scored, p.inception) == (*want[name], "adm_tf")
  config.model.name = "fake"
  with pytest.raises(UserError, match="config.evaluate.protocol"):
    tokenizer.evaluate(config, str(tmp_path))


def test_bad_evaluation_settings_are_refused_up_front(tok_config, tmp_path,
                                                     monkeypatch):
  """Each message names the setting, before any weights load."""
  config, built, seen = tok_config
  loads = []
  monkeypatch.setattr(tokenizer.models, "load_params",
                      lambda *a, **k: loads.append(a) or {})
  cases = [
      (dict(protocol="FQGAN"), "config.evaluate.protocol='FQGAN' is not one of"),
      (dict(preprocess="pytorch-fid"), "config.evaluate.preprocess='pytorch-fid'"),
      (dict(batch_size=0), "config.evaluate.batch_size=0 must be a whole "
       "number of images, at least 1"),
  ]
  for update, message in cases:
    ev = config.evaluate.copy_and_resolve_references()
    ev.update(update)
    bad = config.copy_and_resolve_references()
    bad.evaluate = ev
    with pytest.raises(UserError, match=message):
      tokenizer.evaluate(bad, str(tmp_path))
  assert not seen.resizes and not loads   # no Inception built, no weights read
  # A protocol whose crop the images cannot take says where the crop came
  # from and which flag fixes it.
  config.data.image_width = 64
  with pytest.raises(UserError, match="maskgit_vqgan evaluation protocol's.*"
                     "--config.data.center_crop=adm"):
    tokenizer.evaluate(config, str(tmp_path))


def test_tokenizer_eval_refuses_more_images_than_the_split(tok_config, tmp_path,
                                                           monkeypatch):
  config, _, seen = tok_config
  config.evaluate.update(dict(num_images=21, batch_size=4))
  with pytest.raises(batching.NotEnoughImages,
                     match=r"has 20 images but 21 .*config\.evaluate\.num_images"):
    tokenizer.evaluate(config, str(tmp_path))
  config.evaluate.update(dict(num_images=5, dtype=""))   # keep the model's dtype
  tokenizer.evaluate(config, str(tmp_path))
  # A full disk at the grid: the numbers are written first, not lost with it.
  import errno  # pylint: disable=import-outside-toplevel
  from genvis_jax import errors  # pylint: disable=import-outside-toplevel
  (tmp_path / "metrics.json").unlink()
  def full(*_):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(tokenizer.metrics_lib, "save_png", full)
  with pytest.raises(errors.OutputWriteError,
                     match=r"reconstructions.png failed \(.*No space left.*\); "
                           r"the numbers are in metrics.json"):
    tokenizer.evaluate(config, str(tmp_path))
  assert (tmp_path / "metrics.json").exists()


def test_tokenizer_eval_of_all_images_skips_unreadable_files(tok_config, tmp_path):
  from PIL import Image
  config, _, seen = tok_config
  root = tmp_path / "imgs" / "a"
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / f"{i}.png")
  (root / "2b.png").write_bytes(b"not a png")
  config.data.update(dict(source="image_folder", path=str(tmp_path / "imgs")))
  config.evaluate.update(dict(num_images=0, batch_size=4))
  res = tokenizer.evaluate(config, str(tmp_path / "out"))
  assert res["num_images"] == 6
  # metrics.json says why its numbers are not comparable (warned of in the
  # log only before): the validation split reads the training images (class
  # folders only), and one unreadable file was skipped.
  saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert [c.split(":")[0] for c in saved["caveats"][:1]] == [
      f"Image folder {str(tmp_path / 'imgs')!r} holds class folders only"]
  assert re.search(r"1 of its 7 files are unreadable and were skipped; the "
                   r"metrics cover the 6", saved["caveats"][1])
  assert len(saved["caveats"]) == 3   # and rFID of too few images
  config.evaluate.num_images = 5
  assert tokenizer.evaluate(config, str(tmp_path / "out"))["num_images"] == 5
  # Asking for more: the folder's 7 files bound the count, the advice says
  # the unreadable one lowers it; asking for all 7 then names the 6 there are.
  config.evaluate.num_images = 8
  with pytest.raises(batching.NotEnoughImages, match=r"has 7 images but 8 .*"
                     r"at most 7 \(fewer if some of its files are unreadable"):
    tokenizer.evaluate(config, str(tmp_path / "out"))
  config.evaluate.num_images = 7
  with pytest.raises(batching.NotEnoughImages,
                     match=r"ended after 6 images but 7 .*at most 6 "):
    tokenizer.evaluate(config, str(tmp_path / "out"))


def _random_params(model_config):
  """Random weights from the abstract tree (compiling the model's init takes
  15 s on a 2-core CPU): fan-in scaled kernels, unit scales, zero biases."""
  from genvis_jax import models
  abstract = jax.eval_shape(lambda r: models.init_params(model_config, r),
                            jax.random.key(0))
  rng = np.random.default_rng(0)

  def leaf(path, a):
    if len(a.shape) >= 2:
      fan_in = int(np.prod(a.shape[:-1]))
      return rng.normal(size=a.shape).astype(a.dtype) / np.sqrt(fan_in)
    scale = str(path[-1].key) == "scale"
    return (np.ones if scale else np.zeros)(a.shape, a.dtype)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def test_bf16_tokenizer_evaluates_with_fp32_codes():
  from configs import demo
  from genvis_jax import models
  from genvis_jax.models import inference
  cfg = demo.tokenizer_config().model
  cfg.update(dict(image_size=16, hidden_channels=32, channel_mult=(1, 2),
                  z_channels=32, code_dim=32, num_codes=64, dtype="bfloat16"))
  ev_cfg = inference.with_compute_dtype(cfg, "float32", "config.evaluate.dtype")
  assert cfg.dtype == "bfloat16" and ev_cfg.dtype == "float32"
  assert inference.with_compute_dtype(cfg, "", "x").dtype == "bfloat16"
  fp32_cfg = cfg.copy_and_resolve_references()
  fp32_cfg.dtype = "float32"
  params = _random_params(fp32_cfg)
  x = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)

  def roundtrip(c):
    m = models.build(c)

    @jax.jit
    def fn(p, x):
      codes = m.apply({"params": p}, x, method="encode")
      return codes, m.apply({"params": p}, codes, method="decode")
    codes, rec = fn(params, x)
    return np.asarray(codes), np.asarray(rec, np.float32)
  codes_ev, rec_ev = roundtrip(ev_cfg)
  codes_32, rec_32 = roundtrip(fp32_cfg)
  _, rec_16 = roundtrip(cfg)
  np.testing.assert_array_equal(codes_ev, codes_32)
  np.testing.assert_array_equal(rec_ev, rec_32)
  assert np.max(np.abs(rec_16 - rec_32)) > 1e-4   # bf16 really differs
