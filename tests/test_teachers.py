"""Frozen teachers (HF CLIPVisionModel, Dinov2Model): parity with transformers
on random tiny configs (golden fixture), official layouts and parameter counts,
position-table resizes, FQGAN preprocessing and the teacher registry.

``fixtures/teachers_parity.npz`` (see fixtures/README.md) holds HF weights under
their hub names, inputs and HF outputs; no torch or transformers here.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from genvis_jax import convert
from genvis_jax.convert import clip_vision as cclip
from genvis_jax.convert import dinov2 as cdino
from genvis_jax.errors import ConfigError
from genvis_jax.models import clip_vision, dinov2, teachers
from genvis_jax.models.layers import images as images_lib

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "teachers_parity.npz")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
# HF models with random init (transformers 4.41.1 and 5.24.0 agree).
OFFICIAL_COUNTS = {"clip_vit_l14": 303_179_776, "clip_vit_b16": 85_799_424,
                   "dinov2_s14": 22_056_576, "dinov2_b14": 86_580_480}


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def fx():
  with np.load(FIX) as f:
    return {k: f[k] for k in f.files}


def _state(fx, prefix):
  return {k[len(prefix):]: v.astype(np.float32)
          for k, v in fx.items() if k.startswith(prefix)}


def _clip_cfg(fx):
  d, mlp, n, h, s, p = (int(x) for x in fx["clip/config"])
  return dict(hidden_size=d, intermediate_size=mlp, num_hidden_layers=n,
              num_attention_heads=h, image_size=s, patch_size=p)


def _dino_cfg(fx, **kw):
  d, n, h, mlp, s, p = (int(x) for x in fx["dinov2/config"])
  return dict(hidden_size=d, num_hidden_layers=n, num_attention_heads=h,
              mlp_ratio=mlp, image_size=s, patch_size=p, **kw)


@pytest.fixture(scope="module")
def clip_params(fx):
  state = _state(fx, "clip/param/")
  # A CLIPModel checkpoint also carries these; the converter drops them.
  state.update({"text_model.embeddings.token_embedding.weight": np.ones((5, 4)),
                "logit_scale": np.ones(()), "visual_projection.weight": np.ones((3, 32)),
                "vision_model.embeddings.position_ids": np.arange(17)[None]})
  return convert.from_torch("clip_vision", state, _clip_cfg(fx))


@pytest.fixture(scope="module")
def dino_params(fx):
  return convert.from_torch("dinov2", _state(fx, "dinov2/param/"), _dino_cfg(fx))


# --- parity ---------------------------------------------------------------------------

def test_clip_vision_matches_hf_all_outputs(fx, clip_params):
  model = clip_vision.CLIPVisionModel(**_clip_cfg(fx))
  out = model.apply({"params": clip_params}, jnp.asarray(fx["clip/pixels"]),
                    output_hidden_states=True)
  last = fx["clip/last_hidden_state"]
  assert _rel(out["last_hidden_state"], last) < TOL
  assert _rel(out["cls"], last[:, 0]) < TOL           # FQGAN target, pre post-LN
  assert _rel(out["pooled"], fx["clip/pooled"]) < TOL
  assert len(out["hidden_states"]) == 3
  for got, want in zip(out["hidden_states"], fx["clip/hidden_states"]):
    assert _rel(got, want) < TOL
  # The read-out FQGAN uses differs from the post-LN pooled one.
  assert _rel(out["cls"], fx["clip/pooled"]) > 0.1


def test_dinov2_matches_hf_native_masked_and_hidden_states(fx, dino_params):
  model = dinov2.Dinov2Model(**_dino_cfg(fx))
  x = jnp.asarray(fx["dinov2/pixels_native"])
  out = model.apply({"params": dino_params}, x, output_hidden_states=True)
  last = fx["dinov2/native/last_hidden_state"]
  assert _rel(out["last_hidden_state"], last) < TOL
  assert _rel(out["cls"], last[:, 0]) < TOL
  assert _rel(out["patch_tokens"], last[:, 1:]) < TOL
  for got, want in zip(out["hidden_states"], fx["dinov2/native/hidden_states"],
                       strict=True):
    assert _rel(got, want) < TOL
  masked = model.apply({"params": dino_params}, x,
                       jnp.asarray(fx["dinov2/mask"]))["last_hidden_state"]
  assert _rel(masked, fx["dinov2/native/masked_last_hidden_state"]) < TOL


@pytest.mark.parametrize("offset,suffix", [(0.0, ""), (0.1, "_offset")])
def test_dinov2_interpolated_positions_match_hf(fx, dino_params, offset, suffix):
  """rect: 12x18 px -> 3x4 grid (shrink, 2 px cropped); up: 28 px -> 7x7.
  offset 0.0 = transformers 5.24, 0.1 = transformers 4.41.1 (FQGAN's pin)."""
  model = dinov2.Dinov2Model(**_dino_cfg(fx, interpolate_offset=offset))
  for name in ("rect", "up"):
    got = model.apply({"params": dino_params},
                      jnp.asarray(fx[f"dinov2/pixels_{name}"]))
    assert _rel(got["last_hidden_state"],
                fx[f"dinov2/{name}/last_hidden_state{suffix}"]) < TOL, name


@pytest.mark.parametrize("key,kw", [
    ("hf_224x224", {}), ("hf_168x280", {}),
    ("hf441_224x224", {"offset": 0.1}), ("hf441_168x280", {"offset": 0.1}),
    ("timm_224x224", {"antialias": True})])
def test_position_table_resize_of_the_released_37x37_grid(fx, key, kw):
  h, w = (int(v) for v in key.split("_")[1].split("x"))
  got = dinov2.interpolate_pos_encoding(jnp.asarray(fx["pos/table"]), h, w, 14, **kw)
  assert _rel(got, fx[f"pos/{key}"]) < TOL


def test_bicubic_matrix_identities():
  assert np.allclose(images_lib.bicubic_matrix(7, 7), np.eye(7))
  for aa in (False, True):
    for n_in, n_out in ((37, 16), (5, 9)):
      assert np.allclose(images_lib.bicubic_matrix(n_in, n_out, antialias=aa).sum(1), 1)
  # Antialiasing widens the filter when shrinking: more taps per row.
  taps = lambda m: int((np.abs(m) > 0).sum(1).max())
  assert taps(images_lib.bicubic_matrix(37, 16)) == 4
  assert taps(images_lib.bicubic_matrix(37, 16, antialias=True)) > 4


# --- preprocessing -------------------------------------------------------------------

def test_preprocess_matches_fqgan_scaling_layer(fx):
  imgs = jnp.asarray(fx["pre/images"])                   # [-1, 1]
  assert _rel(clip_vision.preprocess(imgs, size=24), fx["pre/clip"]) < 1e-6
  assert _rel(dinov2.preprocess(imgs, size=24), fx["pre/imagenet"]) < 1e-6
  # Same result from [0, 1] images with value_range=(0, 1).
  got = clip_vision.preprocess((imgs + 1) / 2, (0.0, 1.0), size=24)
  assert _rel(got, fx["pre/clip"]) < 1e-6
  for n in (256, 512, 37, 300):
    ramp = jnp.arange(n, dtype=jnp.float32)[None, :, None, None]
    rows = clip_vision.resize_nearest(jnp.broadcast_to(ramp, (1, n, 2, 1)), 224, 2)
    np.testing.assert_array_equal(np.asarray(rows[0, :, 0, 0]), fx[f"pre/nearest_{n}"])


def test_preprocess_agrees_with_generic_teacher_preprocess():
  imgs = jax.random.uniform(jax.random.key(0), (2, 256, 256, 3), minval=-1, maxval=1)
  want = teachers.make_preprocess(224, teachers.OPENAI_CLIP_MEAN,
                                  teachers.OPENAI_CLIP_STD)(imgs)
  got = clip_vision.preprocess(imgs)
  assert got.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_preprocess_rejects_bad_range_and_layout():
  with pytest.raises(ValueError, match="value_range"):
    clip_vision.preprocess(jnp.zeros((1, 8, 8, 3)), (1.0, -1.0))
  with pytest.raises(ValueError, match="NHWC"):
    dinov2.preprocess(jnp.zeros((1, 3, 8, 8)))


# --- official layouts, sizes, conversion plumbing --------------------------------------

@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_full_size_params_match_official_layout_and_count(fx, name):
  """Converts the official key/shape layout (zero-stride arrays, no memory) of
  the released towers and checks every key and the parameter count."""
  layout = json.loads(str(fx["layouts"]))[name]
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, s) for k, s in layout.items()}
  kind = "clip_vision" if name.startswith("clip") else "dinov2"
  params = convert.from_torch(kind, state, name)   # raises on any mismatch
  count = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  assert count == OFFICIAL_COUNTS[name]
  module = (cclip.clip_module if kind == "clip_vision" else cdino.dinov2_module)(name)
  shapes = jax.eval_shape(lambda r: nn.unbox(module.init(
      r, jnp.zeros((1, 224, 224, 3)))["params"]), jax.random.key(0))
  assert sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes)) == count


def test_transformers5_layouts_convert_to_the_same_params(fx, clip_params, dino_params):
  clip5 = {k.removeprefix("vision_model."): v
           for k, v in _state(fx, "clip/param/").items()}
  p = convert.from_torch("clip_vision", clip5, _clip_cfg(fx))
  jax.tree_util.tree_map(np.testing.assert_array_equal, p, clip_params)
  names = {"attention.attention.query": "attention.q_proj",
           "attention.attention.key": "attention.k_proj",
           "attention.attention.value": "attention.v_proj",
           "attention.output.dense": "attention.o_proj"}
  dino5 = {}
  for k, v in _state(fx, "dinov2/param/").items():
    for a, b in names.items():
      k = k.replace(a, b)
    dino5["dinov2." + k] = v                       # + ForImageClassification prefix
  dino5["classifier.weight"] = np.ones((3, 64), np.float32)
  p = convert.from_torch("dinov2", dino5, _dino_cfg(fx))
  jax.tree_util.tree_map(np.testing.assert_array_equal, p, dino_params)


def test_conversion_errors_are_clear(fx):
  state = _state(fx, "clip/param/")
  with pytest.raises(ValueError, match="needs the model config"):
    convert.from_torch("clip_vision", state, None)
  with pytest.raises(convert.CheckpointMismatchError, match="mis-shaped"):
    convert.from_torch("clip_vision", state, dict(_clip_cfg(fx), image_size=35))
  with pytest.raises(ValueError, match="Unknown DINOv2 config"):
    convert.from_torch("dinov2", _state(fx, "dinov2/param/"), "vit_x14")


def test_cli_writes_the_npz_that_teachers_load(fx, tmp_path):
  src = tmp_path / "model.npz"
  np.savez(src, **_state(fx, "dinov2/param/"))
  dst = tmp_path / "dino.npz"
  cfg = os.path.join(REPO, "genvis_jax", "convert", "dinov2.py")
  overrides = [f"--config.model.{k}={v}" for k, v in _dino_cfg(fx).items()]
  # The file's config holds a released tower's fields; override to the tiny one.
  cmd = [sys.executable, "-m", "genvis_jax.convert", "--kind=dinov2",
         f"--src={src}", f"--dst={dst}", f"--config={cfg}:vit_s14", *overrides]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  params = cclip.load_teacher_params(str(dst))
  out = dinov2.Dinov2Model(**_dino_cfg(fx), output="cls").apply(
      {"params": params}, jnp.asarray(fx["dinov2/pixels_native"]))
  assert _rel(out, fx["dinov2/native/last_hidden_state"][:, 0]) < TOL


# --- teacher registry -----------------------------------------------------------------

def test_registered_teachers_give_the_fqgan_cls(fx, clip_params, tmp_path):
  mod, pre = teachers.get_teacher("clip_vision:vit_b16", **_clip_cfg(fx))
  path = str(tmp_path / "clip.npz")
  cclip.save_teacher_params(path, clip_params)
  cls = mod.apply({"params": cclip.load_teacher_params(path)},
                  jnp.asarray(fx["clip/pixels"]))
  assert cls.shape == (2, 32)
  assert _rel(cls, fx["clip/last_hidden_state"][:, 0]) < TOL
  x = pre(jnp.zeros((3, 256, 256, 3)), (-1.0, 1.0))
  assert x.shape == (3, 28, 28, 3)
  for name, width, offset in (("clip_vision:vit_l14", 1024, None),
                              ("clip_vision:vit_b16", 768, None),
                              ("dinov2:vit_s14", 384, 0.1),
                              ("dinov2:vit_b14", 768, 0.0)):
    mod, pre = teachers.get_teacher(name)
    assert mod.output == "cls" and mod.hidden_size == width
    if offset is not None:
      assert mod.interpolate_offset == offset
    assert pre(jnp.zeros((1, 256, 256, 3))).shape == (1, 224, 224, 3)
  assert teachers.get_teacher("dinov2:vit_b14")[0].interpolate_antialias


def test_bfloat16_teacher_stays_close_to_float32(fx, dino_params):
  cfg = _dino_cfg(fx)
  x = jnp.asarray(fx["dinov2/pixels_native"])
  ref = dinov2.Dinov2Model(**cfg, output="cls").apply({"params": dino_params}, x)
  got = dinov2.Dinov2Model(**cfg, output="cls", dtype=jnp.bfloat16).apply(
      {"params": dino_params}, x)
  assert got.dtype == jnp.float32
  assert _rel(got, ref) < 5e-2


def test_bad_inputs_are_clear_errors(fx, clip_params):
  model = clip_vision.CLIPVisionModel(**_clip_cfg(fx))
  with pytest.raises(ValueError, match="expects"):
    model.apply({"params": clip_params}, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="Unknown output"):
    clip_vision.CLIPVisionModel(**_clip_cfg(fx), output="pooler").apply(
        {"params": clip_params}, jnp.asarray(fx["clip/pixels"]))
  with pytest.raises(ConfigError, match=r"Unknown teacher.*'<module>:<variant>'"
                     r".*\['clip_vision', 'dinov2', 'teachers'\]"):
    teachers.get_teacher("clip_vit_h14")
  with pytest.raises(ConfigError, match=r"'vit_h14'.*\['vit_b16', 'vit_l14'\]"):
    teachers.get_teacher("clip_vision:vit_h14")
  with pytest.raises(ConfigError, match="teachers:vit"):
    teachers.get_teacher("teachers:vit_huge")


def test_modules_from_hf_config_json(fx):
  vision = {k: v for k, v in _clip_cfg(fx).items()}
  m = clip_vision.from_hf_config({"vision_config": {**vision, "hidden_act": "quick_gelu",
                                                   "projection_dim": 8}})
  assert (m.hidden_size, m.num_hidden_layers, m.patch_size) == (32, 2, 7)
  with pytest.raises(ConfigError, match="quick_gelu.*OpenAI CLIP checkpoint"):
    clip_vision.from_hf_config({**vision, "hidden_act": "gelu"})
  d = dinov2.from_hf_config({**_dino_cfg(fx), "model_type": "dinov2"},
                            interpolate_offset=0.1)
  assert (d.hidden_size, d.image_size, d.interpolate_offset) == (32, 20, 0.1)
  with pytest.raises(ConfigError, match="SwiGLU.*ViT-S/B/L checkpoint"):
    dinov2.from_hf_config({**_dino_cfg(fx), "use_swiglu_ffn": True})
