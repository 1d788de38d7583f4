"""LPIPS: loading the official key layout from a local npz, metric properties, reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.convert import lpips as convert_lpips
from genvis_jax.models import lpips

S = 32  # four 2x2 pools -> 2x2 maps at relu5_3


def _official_state(seed=0, torchvision_names=False):
  """Random weights under the official LPIPS (or torchvision) names, OIHW."""
  rng = np.random.default_rng(seed)
  state, c_in = {}, 3
  for s, idxs in enumerate(lpips.VGG_SLICES):
    c = lpips.VGG_WIDTHS[s]
    for idx in idxs:
      std = np.sqrt(2.0 / (9 * c_in))
      pre = f"features.{idx}" if torchvision_names else f"net.slice{s + 1}.{idx}"
      state[f"{pre}.weight"] = (rng.normal(size=(c, c_in, 3, 3)) * std).astype(
          np.float32)
      state[f"{pre}.bias"] = (rng.normal(size=(c,)) * 0.1).astype(np.float32)
      c_in = c
    state[f"lin{s}.model.1.weight"] = np.abs(
        rng.normal(size=(1, c, 1, 1))).astype(np.float32) / c
  state["scaling_layer.shift"] = lpips.SHIFT[None, :, None, None]
  return state


def _reference(state, x, y):
  """LPIPS straight from the torch-layout weights in NCHW (no conversion)."""
  def feats(v):
    v = (jnp.transpose(v, (0, 3, 1, 2)) - lpips.SHIFT[:, None, None]) / (
        lpips.SCALE[:, None, None])
    outs = []
    for s, idxs in enumerate(lpips.VGG_SLICES):
      if s:
        v = jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 1, 2, 2),
                                  (1, 1, 2, 2), "VALID")
      for idx in idxs:
        w, b = state[f"net.slice{s + 1}.{idx}.weight"], state[
            f"net.slice{s + 1}.{idx}.bias"]
        v = jax.lax.conv_general_dilated(
            v, w, (1, 1), ((1, 1), (1, 1)), precision="highest") + b[:, None,
                                                                     None]
        v = jax.nn.relu(v)
      outs.append(v)
    return outs
  total = 0.0
  for k, (a, b) in enumerate(zip(feats(x), feats(y))):
    a = a / (jnp.sqrt((a ** 2).sum(1, keepdims=True)) + 1e-10)
    b = b / (jnp.sqrt((b ** 2).sum(1, keepdims=True)) + 1e-10)
    w = state[f"lin{k}.model.1.weight"][0, :, 0, 0]
    total = total + jnp.einsum("bchw,c->bhw", (a - b) ** 2, w).mean((1, 2))
  return total


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  state = _official_state()
  path = tmp_path_factory.mktemp("lpips") / "vgg_lpips.npz"
  np.savez(path, **state)
  params = convert_lpips.load_lpips_params(str(path))
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(k1, (3, S, S, 3))
  y = jnp.clip(x + 0.2 * jax.random.normal(k2, x.shape), 0, 1)
  dist = jax.jit(lpips.lpips_distance, static_argnames=("value_range",))
  return state, params, x, y, dist


def test_loads_official_layout(setup):
  state, params, *_ = setup
  assert params["features_0"]["kernel"].shape == (3, 3, 3, 64)
  assert params["features_28"]["bias"].shape == (512,)
  assert params["lin_2"]["kernel"].shape == (1, 1, 256, 1)
  np.testing.assert_array_equal(
      params["features_5"]["kernel"][1, 2, 7, 9],
      state["net.slice2.5.weight"][9, 7, 1, 2])
  tv = convert_lpips.convert_lpips_state(_official_state(torchvision_names=True))
  jax.tree_util.tree_map(np.testing.assert_array_equal, tv,
                         jax.tree_util.tree_map(np.asarray, params))


def test_metric_properties(setup):
  _, params, x, y, dist = setup
  d_xy = dist(params, x, y)
  assert d_xy.shape == (3,) and d_xy.dtype == jnp.float32
  assert float(d_xy.min()) > 0
  np.testing.assert_allclose(dist(params, x, x), 0.0, atol=1e-7)
  np.testing.assert_allclose(dist(params, y, x), d_xy, rtol=1e-5)
  # [0, 1] inputs are mapped to [-1, 1] first.
  np.testing.assert_allclose(
      dist(params, 2 * x - 1, 2 * y - 1, value_range=(-1, 1)), d_xy, rtol=1e-5)
  # Bigger perturbations give bigger distances here.
  d_far = dist(params, x, 1.0 - x)
  assert bool(jnp.all(d_far > d_xy))


def test_matches_reference_on_torch_layout(setup):
  state, params, x, y, dist = setup
  # One program (the weights as its argument), not one per eager op.
  want = jax.jit(_reference)(state, 2 * x - 1, 2 * y - 1)
  np.testing.assert_allclose(dist(params, x, y), want, rtol=1e-4)


def test_gradient_is_finite(setup):
  _, params, x, y, _ = setup
  g = jax.jit(jax.grad(lambda a, p: lpips.lpips_distance(p, a, y).sum()))(
      x, params)
  assert g.shape == x.shape and bool(jnp.isfinite(g).all())
  assert float(jnp.abs(g).max()) > 0


def test_bad_inputs_raise(setup, tmp_path):
  _, params, x, y, _ = setup
  state = _official_state()
  del state["lin3.model.1.weight"]
  path = tmp_path / "partial.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError, match="lin_3"):
    convert_lpips.load_lpips_params(str(path))
  with pytest.raises(ValueError, match="value_range"):
    lpips.lpips_distance(params, x, y, value_range=(0, 255))
  with pytest.raises(ValueError, match="one shape"):
    lpips.lpips_distance(params, x, y[:1])


def test_tokenizer_training_runs_lpips_in_the_models_dtype(setup):
  """A bf16 tokenizer's LPIPS ran its VGG in fp32 (a tenth of FQGAN's step
  FLOPs and twice the activation memory), where the official recipes run it
  under their bf16 autocast; the distance stays float32."""
  from configs import demo   # pylint: disable=import-outside-toplevel
  from genvis_jax.train.tasks import tokenizer as tok   # pylint: disable=import-outside-toplevel
  _, params, x, y, _ = setup
  for dtype, short in (("float32", "f32"), ("bfloat16", "bf16")):
    c = demo.tokenizer_config()
    c.model.dtype = dtype
    task = tok.TokenizerTask(c)
    jaxpr = str(jax.make_jaxpr(task.perceptual)({"lpips": params}, x, y))
    convs = [l for l in jaxpr.splitlines() if "conv_general_dilated" in l]
    assert convs and all(f":{short}[" in l.split("=")[0] for l in convs), (
        dtype, convs[:2])
    out = jax.eval_shape(task.perceptual, {"lpips": params}, x, y)
    assert out.dtype == jnp.float32 and out.shape == (3,)
