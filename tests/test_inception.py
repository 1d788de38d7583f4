"""FID Inception: parity with pytorch-fid's InceptionV3 (same random weights) via
a golden fixture, the resize/normalisation, the converter and weight loading.

``fixtures/fid_inception_golden.npz`` (see fixtures/README.md) holds the
PyTorch key list, two input images and pytorch-fid's outputs for the weights
that ``random_state(keys, seed)`` below draws; only the outputs are stored, not
the 95 MB of weights.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.convert.inception import (convert as convert_fid_inception,
                                         load_inception_params)
from genvis_jax.evaluate.inception import InceptionExtractor
from genvis_jax import convert
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError
from genvis_jax.models import inception as inc
from genvis_jax.core import sharding
from genvis_jax.core.checkpoint_fit import compare_trees

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures",
                      "fid_inception_golden.npz")


def random_state(keys_shapes, seed=0):
  """Deterministic random FID-Inception state dict (PyTorch names and layout);
  the scratch script that made the fixture draws the same numbers."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in keys_shapes:
    shape = tuple(shape)
    if key.endswith("conv.weight"):
      v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith("bn.weight") or key.endswith("running_var"):
      v = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("bn.bias") or key.endswith("running_mean"):
      v = rng.normal(0.0, 0.1, shape)
    elif key == "fc.weight":
      v = rng.standard_normal(shape) / np.sqrt(shape[1])
    elif key == "fc.bias":
      v = rng.normal(0.0, 0.1, shape)
    else:
      raise KeyError(key)
    out[key] = v.astype(np.float32)
  return out


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def state(golden):
  return random_state(json.loads(str(golden["keys_shapes"])), int(golden["seed"]))


def test_matches_pytorch_fid(golden, state):
  params = convert_fid_inception(state)
  compare_trees(inc.abstract_inception_params(), params, "converted")
  # Two images split over two devices, the way evaluation runs.
  ex = InceptionExtractor(params, batch_size=2,
                              mesh=sharding.data_mesh(jax.devices()[:2]))
  out = ex(golden["images"])
  assert out["pool"].shape == (2, 2048)
  assert out["spatial"].shape == (2, 17 * 17 * 7)
  assert out["logits"].shape == (2, 1008)
  for k in ("pool", "spatial", "logits"):
    err = np.abs(out[k] - golden[k]).max() / np.abs(golden[k]).max()
    assert err < 1e-4, (k, err)
  # uint8 input is the same as float / 255.
  u8 = np.round(golden["images"] * 255).astype(np.uint8)
  np.testing.assert_allclose(ex(u8)["pool"], ex(u8 / np.float32(255))["pool"],
                             rtol=1e-5, atol=1e-5)


def _resize(x, size, half_pixel):
  mh = inc.resize_matrix(x.shape[1], size[0], half_pixel)
  mw = inc.resize_matrix(x.shape[2], size[1], half_pixel)
  return np.einsum("pw,bowc->bopc", mw, np.einsum("oh,bhwc->bowc", mh, x))


def test_resize_matches_torch_and_tf1(golden):
  x = golden["resize_in"]
  for name, half in (("torch", True), ("tf", False)):
    for kind, size in (("up", (29, 31)), ("down", (7, 9))):
      np.testing.assert_allclose(_resize(x, size, half), golden[f"{name}_{kind}"],
                                 atol=2e-6, err_msg=f"{name} {kind}")
  np.testing.assert_allclose(
      np.asarray(inc.resize_bilinear(jnp.asarray(x[:, :13, :13]), 29, True)),
      _resize(x[:, :13, :13], (29, 29), True), atol=1e-6)


def test_adm_tf_input_matches_tensorflows_legacy_resize():
  """ADM's graph resizes the bytes with TF1's ResizeBilinear, whose source
  coordinates are float32: ours were float64 (weights off by up to 9e-6)
  and went through x / 255 and back, 2.6e-5 (256 px) to 1.4e-4 (256 x 2048)
  off in the network's input units; now float32 rounding."""
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(0)
  for h, w in ((256, 256), (64, 2048)):
    x = rng.integers(0, 256, (1, h, w, 3)).astype(np.uint8)
    want = tf.compat.v1.image.resize_bilinear(
        x.astype(np.float32), [299, 299], align_corners=False,
        half_pixel_centers=False).numpy()
    got = np.asarray(inc.preprocess_images(jnp.asarray(x), 299, "adm_tf"))
    np.testing.assert_allclose(got, (want - 128.0) / 128.0, rtol=0, atol=1e-6,
                               err_msg=f"{h}x{w}")


def test_preprocess_ranges():
  img = jnp.full((1, 4, 4, 3), 0.5)
  assert np.allclose(inc.preprocess_images(img, 8, "pytorch_fid"), 0.0)
  assert np.allclose(inc.preprocess_images(img, 8, "adm_tf"), -0.5 / 128)
  u8 = jnp.full((1, 4, 4, 3), 255, jnp.uint8)
  assert np.allclose(inc.preprocess_images(u8, 8, "pytorch_fid"), 1.0)
  assert np.allclose(inc.preprocess_images(u8, 8, "adm_tf"), 127 / 128)
  with pytest.raises(ValueError, match="preprocess"):
    inc.preprocess_images(img, 8, "tf2")
  with pytest.raises(ValueError, match="NHWC"):
    inc.preprocess_images(jnp.zeros((1, 3, 4, 4)), 8)


def test_converter_layout_and_errors(state):
  params = convert_fid_inception({**state, "Mixed_5b.branch1x1.bn.num_batches_tracked":
                                  np.array(3)})
  w = state["Mixed_6d.branch7x7_2.conv.weight"]            # (160, 160, 1, 7)
  np.testing.assert_array_equal(
      params["Mixed_6d"]["branch7x7_2"]["conv"]["kernel"], w.transpose(2, 3, 1, 0))
  assert params["Mixed_6d"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 160, 160)
  bn = params["Conv2d_1a_3x3"]["bn"]
  np.testing.assert_array_equal(bn["mean"], state["Conv2d_1a_3x3.bn.running_mean"])
  np.testing.assert_array_equal(bn["var"], state["Conv2d_1a_3x3.bn.running_var"])
  np.testing.assert_array_equal(params["fc"]["kernel"], state["fc.weight"].T)
  with pytest.raises(ValueError, match="auxiliary head"):
    convert_fid_inception({"AuxLogits.fc.weight": np.zeros((1008, 768))})
  # Unknown keys keep their names: one report lists them with the missing.
  bad = {k: v for k, v in state.items() if k != "fc.bias"}
  bad["Mixed_5b.branch1x1.conv.bias"] = np.zeros(64, np.float32)
  bad["Mixed_5b.branch1x1.bn.extra"] = np.zeros(64, np.float32)
  with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): fc/bias"
                     r"(.|\n)*unexpected \(2\): Mixed_5b.branch1x1.bn.extra, "
                     r"Mixed_5b.branch1x1.conv.bias"):
    convert.from_torch("inception", bad, None)


def test_load_inception_params_from_npz(tmp_path, state):
  pt = tmp_path / "pt_inception.npz"
  np.savez(pt, **state)
  params = load_inception_params(str(pt))
  flax = tmp_path / "flax.npz"
  np.savez(flax, **inc.flatten_params(params))
  again = load_inception_params(str(flax))
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.savez(tmp_path / "short.npz", **{k: v for k, v in state.items()
                                      if not k.startswith("Mixed_7c")})
  with pytest.raises(ValueError, match="missing"):
    load_inception_params(str(tmp_path / "short.npz"))
  with pytest.raises(FileNotFoundError, match="convert"):
    load_inception_params(str(tmp_path / "nope.npz"))


def test_registered_converter_kind(state):
  from genvis_jax.convert import CheckpointMismatchError, from_torch
  params = from_torch("inception", state, None)
  np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["bn"]["scale"],
                                state["Mixed_7c.branch_pool.bn.weight"])
  short = {k: v for k, v in state.items() if k != "fc.bias"}
  with pytest.raises(CheckpointMismatchError, match="fc/bias"):
    from_torch("inception", short, None)
