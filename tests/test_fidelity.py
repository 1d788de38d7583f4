"""Official-recipe fidelity of the data our pipelines produce.

* Eval centre crops = ADM's, torchvision's or albumentations' (OpenCV).
* Ten-crop pre-tokenization = ADM ``center_crop_arr(img, int(1.1 * size))``
  followed by torchvision ``TenCrop(size)``, from a decoded file to the crops
  the tokenizer encodes.
* Sample bytes = each system's official float -> uint8 conversion.
* Pipeline floats = torchvision ``ToTensor`` (+ ``Normalize(0.5, 0.5)``).
* Tokenizers produce data in fp32 even when their config trains in bf16.

The official formulas are re-stated here from their definitions (PIL, OpenCV's
resize and numpy), independently of the code under test.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import base, eq_tokenizer, fqgan_demo
from genvis_jax import errors
from genvis_jax import models
from genvis_jax.data import pretokenize, ten_crop, tokens
from genvis_jax.errors import UserError
from genvis_jax.models import inference
from genvis_jax.sample import images as images_lib
from genvis_jax.sample import parts
from genvis_jax.sample import sampler as sampler_lib
from genvis_jax.core import pixels
from genvis_jax.core import weights as weights_lib
from tests import compiles


# --- official formulas, re-stated ---------------------------------------------

def adm_center_crop_arr(pil, image_size):
  """guided-diffusion ``center_crop_arr``: BOX-halve while the short side is
  >= 2x, BICUBIC so the short side == image_size, crop at floor offsets."""
  while min(pil.size) >= 2 * image_size:
    pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
  scale = image_size / min(pil.size)
  pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)),
                   resample=Image.BICUBIC)
  arr = np.array(pil)
  y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[y:y + image_size, x:x + image_size]


def torchvision_ten_crop(arr, s):
  """torchvision ``TenCrop(s)``: five_crop(img) + five_crop(hflip(img)),
  five_crop = tl, tr, bl, br, centre at int(round((H - s) / 2.0))."""
  def five(a):
    h, w = a.shape[:2]
    t, l = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    return [a[:s, :s], a[:s, w - s:], a[h - s:, :s], a[h - s:, w - s:],
            a[t:t + s, l:l + s]]
  return five(arr) + five(np.ascontiguousarray(arr[:, ::-1]))


def torchvision_resize_center_crop(pil, s):
  """torchvision ``Resize(s, BICUBIC)`` of a PIL image (short side s, long
  side ``int(s * long / short)``, no resize when already that size), then
  ``CenterCrop(s)`` at ``int(round((H - s) / 2.0))`` (1d-tokenizer's eval)."""
  w, h = pil.size
  size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
  if size != pil.size:
    pil = pil.resize(size, resample=Image.BICUBIC)
  arr = np.array(pil)
  t, l = int(round((arr.shape[0] - s) / 2.0)), int(round((arr.shape[1] - s) / 2.0))
  return arr[t:t + s, l:l + s]


def albumentations_center_crop(pil, s):
  """albumentations ``SmallestMaxSize(s)`` (``cv2.INTER_LINEAR``; sides
  ``round(dim * s / short)``, no resize at scale 1) + ``CenterCrop(s, s)`` at
  ``(H - s) // 2`` (Equivariant ``tokenizer/data/base.py`` ``ImagePaths``)."""
  import cv2  # pylint: disable=import-outside-toplevel
  arr = np.array(pil)
  h, w = arr.shape[:2]
  scale = s / float(min(h, w))
  if scale != 1.0:
    arr = cv2.resize(arr, (round(w * scale), round(h * scale)),
                     interpolation=cv2.INTER_LINEAR)
  t, l = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
  return arr[t:t + s, l:l + s]


# (width, height): non-square, and one big enough to be BOX-halved at 256.
IMAGE_SIZES = ((400, 333), (700, 530), (1300, 1100))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """An image folder (class "a") of noisy gradients at IMAGE_SIZES."""
  root = tmp_path_factory.mktemp("photos")
  (root / "a").mkdir()
  rng = np.random.default_rng(0)
  for i, (w, h) in enumerate(IMAGE_SIZES):
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1)
    noise = rng.integers(-40, 41, (h, w, 3))
    img = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(root / "a" / f"{i}.png")
  return root


def _pretokenize_config(data_path, size, *, ten_crop=True, batch_size=3,
                        source="image_folder"):
  c = base.get_config()
  d = c.data
  d.source, d.path, d.image_size, d.num_classes = source, str(data_path), size, 1
  d.read_threads = 2
  base.add_pretokenize(c, d, ten_crop=ten_crop, batch_size=batch_size)
  return c


@pytest.mark.parametrize("size", [256, 512])
def test_ten_crop_geometry_matches_official_recipe(photo_folder, size):
  assert ten_crop.ten_crop_cover(size) == int(1.1 * size)   # 281 / 563
  p = _pretokenize_config(photo_folder, size).pretokenize
  it, _ = pretokenize.image_batches(p, (0.0, 1.0), 0, 1)
  batch = next(it)
  crops, labels = ten_crop.model_inputs(
      np.asarray(batch["image"]), np.asarray(batch["label"]), size, True)
  assert crops.shape == (10 * len(IMAGE_SIZES), size, size, 3)
  assert labels.shape == (10 * len(IMAGE_SIZES),)
  got = np.round(crops * 255.0).astype(np.uint8)   # (0, 1) floats are k / 255
  files = sorted(os.listdir(photo_folder / "a"))
  for i, name in enumerate(files):
    with Image.open(photo_folder / "a" / name) as pil:
      cover = adm_center_crop_arr(pil.convert("RGB"), int(size * 1.1))
    want = torchvision_ten_crop(cover, size)
    for j in range(10):
      np.testing.assert_array_equal(got[10 * i + j], want[j],
                                    err_msg=f"{name} crop {j} at {size}")


# (width, height) for the eval crops: landscape, portrait, square, a portrait
# neither resizes at 256, 397 x 333 whose centre offset 24.5 rounds to even
# (24, as ADM's floor; half-up would give 25), and 307 x 256 whose 25.5
# rounds to 26 where ADM floors to 25.
CROP_SIZES = ((400, 333), (333, 400), (300, 300), (256, 300), (397, 333),
              (307, 256))


@pytest.mark.parametrize("method,official", [
    ("adm", adm_center_crop_arr), ("torchvision", torchvision_resize_center_crop),
    ("albumentations", albumentations_center_crop)])
def test_eval_center_crops_match_official_recipes(tmp_path, method, official):
  """The eval pipeline's centre crop (``config.data.center_crop``): ADM's
  (LlamaGen / FQGAN evaluations), torchvision's (1d-tokenizer's) or
  albumentations' (the Equivariant tokenizer's validation), from the decoded
  files to the float batch."""
  from genvis_jax import data as data_lib
  (tmp_path / "a").mkdir()
  rng = np.random.default_rng(1)
  for i, (w, h) in enumerate(CROP_SIZES):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        tmp_path / "a" / f"{i}.png")
  c = _pretokenize_config(tmp_path, 256).data
  c.update(dict(center_crop=method, random_crop=False, random_flip=False))
  it, _ = data_lib.create_dataset(c, split="train", global_batch_size=6,
                                  seed=0, train=False, drop_remainder=False)
  got = np.round(np.asarray(next(it)["image"]) * 255.0).astype(np.uint8)
  differ = []
  for i in range(len(CROP_SIZES)):
    with Image.open(tmp_path / "a" / f"{i}.png") as pil:
      pil = pil.convert("RGB")
      np.testing.assert_array_equal(got[i], official(pil, 256),
                                    err_msg=str(CROP_SIZES[i]))
      differ.append(not np.array_equal(adm_center_crop_arr(pil, 256),
                                       torchvision_resize_center_crop(pil, 256)))
  # The recipes differ where they resize or place the crop differently.
  assert differ == [True, True, False, False, False, True]
  c.center_crop = "bicubic"
  with pytest.raises(UserError, match=r"'bicubic' \(config.data.center_crop\)"):
    data_lib.create_dataset(c, split="train", global_batch_size=3, seed=0,
                            train=False)
  c.update(dict(center_crop="torchvision", image_width=300))
  with pytest.raises(UserError, match="square images.*"
                     "--config.pretokenize.data.center_crop=adm"):
    data_lib.create_dataset(c, split="train", global_batch_size=3, seed=0,
                            train=False, setting="config.pretokenize.data")


# --- uint8 conversion ------------------------------------------------------------

def _edge_values(lo, hi):
  """Values on and next to every byte boundary of both the truncating and the
  rounding formulas, plus out-of-range ones, in ``(lo, hi)``."""
  k = np.arange(256, dtype=np.float64)
  u = np.concatenate([k / 255, (k + 0.5) / 255, [-0.3, 1.2]])
  u = np.concatenate([u, np.nextafter(u, 2), np.nextafter(u, -2)])
  rng = np.random.default_rng(3)
  u = np.concatenate([u, rng.uniform(-0.05, 1.05, 4002)])
  return (lo + u * (hi - lo)).astype(np.float32).reshape(-1, 1, 1, 3)


def official_rar(x):        # 1d-tokenizer: clamp(0, 1) * 255 -> uint8
  x = np.asarray(x, np.float32)
  return np.trunc(np.minimum(np.maximum(x, 0), 1) * np.float32(255)).astype(np.uint8)


def official_llamagen(x):   # LlamaGen / FQGAN: clamp(127.5 x + 128, 0, 255)
  x = np.asarray(x, np.float32)
  y = x * np.float32(127.5) + np.float32(128)
  return np.trunc(np.minimum(np.maximum(y, 0), 255)).astype(np.uint8)


def official_equivariant(x):  # (x + 1) / 2; round(clip(x * 255, 0, 255))
  x = (np.asarray(x, np.float32) + np.float32(1)) / np.float32(2)
  return np.round(np.minimum(np.maximum(x * np.float32(255), 0), 255)).astype(np.uint8)


def official_1d_tokenizer_eval(x):  # round(clamp(x, 0, 1) * 255)
  x = np.minimum(np.maximum(np.asarray(x, np.float32), 0), 1)
  return np.round(x * np.float32(255)).astype(np.uint8)


@pytest.mark.parametrize("model_name,value_range,official", [
    ("maskgit_vqgan", (0.0, 1.0), official_rar),
    ("llamagen_vq", (-1.0, 1.0), official_llamagen),
    ("fqgan", (-1.0, 1.0), official_llamagen),
    ("eq_tokenizer", (-1.0, 1.0), official_equivariant),
])
def test_uint8_default_is_each_systems_official_conversion(model_name,
                                                           value_range,
                                                           official):
  c = base.add_tokenizer(base.get_config(),
                         ml_collections.ConfigDict({"name": model_name}))
  method = images_lib.uint8_method(c.tokenizer)
  x = _edge_values(*value_range)
  got = pixels.to_uint8(x, value_range, method)
  assert got.dtype == np.uint8 and got.shape == x.shape
  np.testing.assert_array_equal(got, official(x))
  # bf16 decoder outputs are widened, not rejected.
  xb = jnp.asarray(x[:300], jnp.bfloat16)
  np.testing.assert_array_equal(
      pixels.to_uint8(xb, value_range, method),
      official(np.asarray(xb, np.float32)))


def test_uint8_methods_differ_override_and_errors():
  x = _edge_values(-1.0, 1.0)
  outs = {m: pixels.to_uint8(x, (-1.0, 1.0), m)
          for m in pixels.UINT8_METHODS}
  assert not np.array_equal(outs["truncate"], outs["llamagen"])
  assert not np.array_equal(outs["llamagen"], outs["round"])
  # "round" of a (0, 1) image is 1d-tokenizer's reconstruction-eval formula
  # (no detour through [-1, 1]); a (-1, 1) one truncated as RAR does.
  u = _edge_values(0.0, 1.0)   # holds float32 values whose x 255 is k + 0.5
  np.testing.assert_array_equal(pixels.to_uint8(u, (0.0, 1.0), "round"),
                                official_1d_tokenizer_eval(u))
  np.testing.assert_array_equal(pixels.to_uint8(x, (-1.0, 1.0), "truncate"),
                                official_rar((x + np.float32(1)) / np.float32(2)))
  c = base.add_tokenizer(base.get_config(),
                         ml_collections.ConfigDict({"name": "maskgit_vqgan"}))
  c.tokenizer.uint8 = "round"
  assert images_lib.uint8_method(c.tokenizer) == "round"
  c.tokenizer.uint8 = "floor"
  with pytest.raises(UserError, match="config.tokenizer.uint8='floor'"):
    images_lib.uint8_method(c.tokenizer)
  with pytest.raises(ValueError, match="truncate"):
    pixels.to_uint8(x, (-1.0, 1.0), "floor")
  c.tokenizer.uint8 = ""
  c.tokenizer.model.name = "my_tokenizer"
  with pytest.raises(UserError, match="--config.tokenizer.uint8"):
    images_lib.uint8_method(c.tokenizer)


# --- fp32 tokenizers in data-producing modes -----------------------------------

def test_data_model_config_dtype():
  m = ml_collections.ConfigDict({"name": "fqgan", "dtype": "bfloat16",
                                 "param_dtype": "float32"})
  c = base.add_tokenizer(base.get_config(), m)
  assert inference.data_model_config(c.tokenizer).dtype == "float32"
  assert m.dtype == "bfloat16"                      # a copy, not an edit
  legacy = ml_collections.ConfigDict({"model": m})  # config without the key
  assert inference.data_model_config(legacy).dtype == "float32"
  c.tokenizer.dtype = ""
  assert inference.data_model_config(c.tokenizer).dtype == "bfloat16"
  c.tokenizer.dtype = "fp32"
  with pytest.raises(UserError, match="config.tokenizer.dtype='fp32'"):
    inference.data_model_config(c.tokenizer)


def _random_params(model_cfg, seed):
  """Random parameters of ``model_cfg`` without compiling its init (slow on
  CPU): N(0, 1/fan_in) kernels / tables, scales near 1, small biases."""
  abstract = jax.eval_shape(lambda k: models.init_params(model_cfg, k),
                            jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(a.shape).astype(np.float32)
    if a.ndim >= 2:
      return z / np.sqrt(np.prod(a.shape[:-1]))
    return 1 + 0.1 * z if "scale" in name else 0.1 * z

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _tiny_fqgan_bf16():
  m = fqgan_demo.fq_tokenizer_demo_config().model
  m.update(dict(image_size=16, hidden_channels=32, channel_mult=(1, 1),
                z_channels=32, adapter_layers=1, adapter_heads=2, feat_heads=(),
                feat_layers=0, dtype="bfloat16"))
  return m


def _encode(model_cfg, params, images):
  fn = jax.jit(lambda p, x: pretokenize.flatten_codes(
      models.build(model_cfg).apply({"params": p}, x, method="encode")))
  return np.asarray(fn(params, images))


def test_bf16_fqgan_config_pretokenizes_with_fp32_codes(tmp_path, capsys,
                                                        monkeypatch):
  m = _tiny_fqgan_bf16()
  params = _random_params(m, 0)
  weights_lib.save_params(str(tmp_path / "tok"), params)
  root = tmp_path / "imgs"
  (root / "a").mkdir(parents=True)
  rng = np.random.default_rng(1)
  for i in range(4):   # non-square: the 17 px ten-crop cover is cut from them
    img = rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "a" / f"{i}.png")
  c = _pretokenize_config(root, 16, batch_size=2)
  base.add_tokenizer(c, m, checkpoint=str(tmp_path / "tok"))
  c.pretokenize.output = str(tmp_path / "tokens" / "train")
  out = pretokenize.pretokenize(c, str(tmp_path))
  assert out["records"] == 40
  written = tokens.TokenSource(out["pattern"])
  got = np.stack([written[i]["tokens"] for i in range(len(written))])

  it, _ = pretokenize.image_batches(c.pretokenize, (-1.0, 1.0), 0, 1)
  crops = np.concatenate([
      ten_crop.model_inputs(b["image"], b["label"], 16, True)[0] for b in it])
  fp32 = ml_collections.ConfigDict(m.to_dict())
  fp32.dtype = "float32"
  want = _encode(fp32, params, crops)
  bf16 = _encode(m, params, crops)
  assert got.shape == want.shape == (40, 2, 64)
  np.testing.assert_array_equal(got, want)
  # The configured bf16 model would have written other codes.
  assert (bf16 != want).mean() > 0.002

  # A re-run reuses the file it wrote; other tokenizer weights are refused
  # until asked to overwrite; nothing half-written is ever left under the name.
  path = out["files"][0]
  before, written_at = open(path, "rb").read(), os.stat(path).st_mtime_ns
  assert pretokenize.pretokenize(c, str(tmp_path))["records"] == 40
  assert os.stat(path).st_mtime_ns == written_at      # reused, not rewritten
  weights_lib.save_params(str(tmp_path / "tok"), _random_params(m, 1))
  with pytest.raises(errors.OutputExistsError, match=r"other settings \(weights: 'params sha256"):
    pretokenize.pretokenize(c, str(tmp_path))
  assert open(path, "rb").read() == before
  c.pretokenize.overwrite = True
  # An overwrite stopped part-way leaves the old file with its own record
  # (not the old tokens without one, which training would read unchecked).
  with open(path + ".json") as f:
    record = f.read()
  for where, target in (("encoding", (pretokenize, "encode_in_chunks")),
                        ("hashing the new file", (tokens, "file_sha256"))):
    with monkeypatch.context() as m:
      m.setattr(*target, lambda *_: (_ for _ in ()).throw(RuntimeError(where)))
      with pytest.raises(RuntimeError, match=where):
        pretokenize.pretokenize(c, str(tmp_path))
    with open(path + ".json") as f:
      assert f.read() == record and open(path, "rb").read() == before, where
  assert not list(tmp_path.glob("tokens/*.partial"))
  assert pretokenize.pretokenize(c, str(tmp_path))["records"] == 40
  assert open(path, "rb").read() != before
  # An image added to the folder since: the file is stale, refused by name.
  Image.fromarray(np.zeros((19, 23, 3), np.uint8)).save(root / "a" / "new.png")
  c.pretokenize.overwrite = False
  with pytest.raises(errors.OutputExistsError,
                     match=r"examples.count: 4 -> 5, examples.files_sha256"):
    pretokenize.pretokenize(c, str(tmp_path))
  # An unreadable file is skipped, and the summary and record count it.
  (root / "a" / "broken.png").write_bytes(b"not an image")
  c.pretokenize.overwrite = True
  capsys.readouterr()
  assert pretokenize.pretokenize(c, str(tmp_path))["records"] == 50
  assert (f"(5 images of image_folder {str(root)!r}, 1 unreadable files "
          "skipped, ten-crop)" in capsys.readouterr().out)
  with open(path + ".json") as f:
    assert json.load(f)["skipped_files"] == 1
  # One read after the last batch (the images fill whole batches) was not
  # counted: the iterator's state is the last batch's.
  (root / "a" / "zz_broken.png").write_bytes(b"not an image")
  c.pretokenize.batch_size = 5
  capsys.readouterr()
  pretokenize.pretokenize(c, str(tmp_path))
  assert "2 unreadable files skipped" in capsys.readouterr().out
  with open(path + ".json") as f:
    assert json.load(f)["skipped_files"] == 2
  with pytest.raises(KeyboardInterrupt):
    with tokens.TokenWriter(str(tmp_path / "cut.array_record")) as w:
      w.write(0, np.zeros(4, np.int32))
      raise KeyboardInterrupt
  assert not list(tmp_path.glob("cut.array_record*"))


def test_sample_decode_runs_fp32_with_official_bytes(tmp_path, caplog):
  """The Equivariant sampler's decode (sampler): a bf16 tokenizer config decodes
  in fp32, then the official round((x + 1) / 2 * 255)."""
  m = eq_tokenizer.tokenizer_model(
      ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
      resolution=16, image_width=16, z_channels=8, embed_dim=8,
      len_down_scale=4, semantic=False, dtype="bfloat16")
  params = _random_params(m, 0)
  weights_lib.save_params(str(tmp_path / "tok"), params)
  c = base.add_tokenizer(base.get_config(), m, checkpoint=str(tmp_path / "tok"))
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  decode = sampler_lib.make_decode_fn(c.tokenizer, mesh)
  # It holds the weights decode reads, not the encoder's.
  held = decode._params   # pylint: disable=protected-access
  assert "encoder" in params and "encoder" not in held, sorted(held)
  assert set(held) == {"decoder", "post_quant_layer"}, sorted(held)
  latents = jax.random.normal(jax.random.key(2), (8, 1, 8))
  sharded = jax.device_put(latents, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  got = np.asarray(decode(sharded))

  fp32 = ml_collections.ConfigDict(m.to_dict())
  fp32.dtype = "float32"
  ref = jax.jit(lambda p, z: models.build(fp32).apply(
      {"params": p}, z, method="decode"))(params, latents)
  want = official_equivariant(np.asarray(ref))
  assert got.dtype == np.uint8 and got.shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(got, want)
  # A NaN latent (a diverged generator) decodes to NaN pixels, which uint8
  # would make black: refused instead.
  with pytest.raises(sampler_lib.NonFiniteSamplesError, match="NaN or Inf"):
    decode(sharded.at[3].set(jnp.nan))
  # A decoder built again (a notebook's re-run cell, a draw() per call)
  # runs the same program: nothing compiles again.
  with compiles.compiled(caplog) as programs:
    again = sampler_lib.make_decode_fn(c.tokenizer, mesh)
    np.testing.assert_array_equal(np.asarray(again(sharded)), got)
  assert not programs, programs
  settings = parts.sample_settings(_sample_config(c))
  assert settings["tokenizer.uint8"] == "round"
  assert settings["tokenizer.dtype"] == "float32"


def _sample_config(c):
  c.model = ml_collections.ConfigDict({"name": "eq_generator"})
  c.sample = ml_collections.ConfigDict({"num_samples": 8})
  return c
