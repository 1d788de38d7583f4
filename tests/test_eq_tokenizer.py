"""Equivariant column tokenizer: its layers, shapes, gradients, sizes,
sharding and parity with the official model (tiny configs on CPU; its
training task and DINO discriminator: ``test_eq_tokenizer_task.py``)."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import eq_demo
from configs import eq_tokenizer as eq_tok_config
from genvis_jax import models
from genvis_jax.models import eq_tokenizer as eqt
from genvis_jax.models import layers
from genvis_jax.models.layers import resample
from tests.eq_parity import (FIXTURE, assert_tokenizer_parity, fixture_params,
                              parity_tokenizer_config)

def tiny_model(**kw):
  """The demo tokenizer, slimmed: 16-px columns, 32 channels everywhere."""
  m = eq_demo.tokenizer_model()
  m.update(dict(ch_mult=(1, 1, 1, 1, 1)))
  m.update(kw)
  return m


def np_init(abstract, seed=0, std=0.05):
  """Random parameters from shapes alone (numpy: no XLA compile); norm scales 1."""
  rs = np.random.RandomState(seed)
  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return jnp.ones(a.shape, a.dtype)
    return jnp.asarray(rs.normal(0.0, std, a.shape).astype(a.dtype))
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def abstract_params(cfg):
  return jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.key(0))


def mini_model():
  """Two levels (2-px columns): the smallest graph for the loss tests."""
  return tiny_model(ch_mult=(1, 1), len_down_scale=1, attn_resolutions=(),
                    z_channels=4, embed_dim=8)


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_model()
  model = models.build(cfg)
  return cfg, model, np_init(abstract_params(cfg))


# --- pure helpers ------------------------------------------------------------------


def test_reflect_pad_matches_torch_reflect():
  x = jnp.arange(1.0, 4.0).reshape(1, 3, 1, 1)        # rows 1, 2, 3
  y = resample.reflect_pad(x, 1, (1,))[0, :, 0, 0]
  np.testing.assert_array_equal(y, [2, 1, 2, 3, 2])   # edge not repeated
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
  np.testing.assert_array_equal(
      resample.reflect_pad(x, 2, (1, 2)),
      np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect"))


def _torch_unshuffle_nchw(x, fh, fw):
  """numpy transcription of the official NCHW PixelUnshuffle formula."""
  b, c, h, w = x.shape
  x = x.reshape(b, c, h // fh, fh, w // fw, fw).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, c * fh * fw, h // fh, w // fw)


@pytest.mark.parametrize("factors", [(2, 2), (2, 1)])
def test_pixel_unshuffle_shuffle_inverse_and_torch_order(factors):
  x = jax.random.normal(jax.random.key(1), (2, 8, 12, 6))
  y = resample.pixel_unshuffle(x, factors)
  g = factors[0] * factors[1]
  assert y.shape == (2, 8 // factors[0], 12 // factors[1], 6 * g)
  np.testing.assert_array_equal(resample.pixel_shuffle(y, factors), x)
  ref = _torch_unshuffle_nchw(np.asarray(x).transpose(0, 3, 1, 2), *factors)
  np.testing.assert_array_equal(np.asarray(y).transpose(0, 3, 1, 2), ref)


def test_columnize_order_and_inverse():
  h = jax.random.normal(jax.random.key(2), (2, 3, 5, 4))    # (B, Hl, W, C)
  t = eqt.columnize(h)
  assert t.shape == (2, 5, 12)
  # torch: feature index c * Hl + row.
  np.testing.assert_array_equal(t[1, 4, 2 * 3 + 1], h[1, 1, 4, 2])
  np.testing.assert_array_equal(eqt.rasterize(t, 4), h)


def test_residual_resamplers_reduce_to_pool_and_nearest():
  x = jax.random.normal(jax.random.key(3), (2, 4, 6, 8))
  zeros = lambda m: jax.tree_util.tree_map(
      lambda a: jnp.zeros(a.shape), jax.eval_shape(m.init, jax.random.key(0), x))
  down = resample.DownsampleResidual((2, 2))
  p = zeros(down)                                     # residual path only
  pooled = np.asarray(x).reshape(2, 2, 2, 3, 2, 8).mean(axis=(2, 4))
  np.testing.assert_allclose(down.apply(p, x), pooled, atol=1e-6)
  up = resample.UpsampleResidual((2, 1))
  p = zeros(up)
  np.testing.assert_allclose(up.apply(p, x), np.repeat(np.asarray(x), 2, axis=1))


def test_posterior_sample_and_kl():
  mean = jnp.ones((512, 3, 4))
  z = eqt.sample_posterior(mean, jax.random.key(4), std=2.5)
  s = np.asarray((z - mean).std(axis=(1, 2)))
  assert s.max() <= 2.5 * 1.6 and s.min() < 0.5      # per-image sigma, clamped
  np.testing.assert_allclose(eqt.kl_loss(2 * mean), np.full(512, 24.0))


# --- model -------------------------------------------------------------------------


@pytest.mark.parametrize("width", [32, 64])
def test_encode_decode_shapes(tiny, width):
  _, model, params = tiny

  @jax.jit
  def run(params, x):
    lat = model.apply({"params": params}, x, method="encode")
    img = model.apply({"params": params}, lat, method="decode")
    recon, aux = model.apply({"params": params}, x, rng=jax.random.key(6))
    return lat, img, recon, aux

  x = jax.random.uniform(jax.random.key(5), (2, 32, width, 3), minval=-1, maxval=1)
  lat, img, recon, aux = run(params, x)
  assert lat.shape == (2, width // 16, 16) and lat.dtype == jnp.float32
  assert img.shape == x.shape and float(jnp.abs(img).max()) <= 1.0
  assert recon.shape == x.shape
  assert aux["latents"].shape == lat.shape and np.isfinite(float(aux["kl"]))
  assert not np.allclose(aux["latents"], lat)           # posterior noise on


def test_uniform_image_gradients_are_finite():
  """A uniform image keeps every encoder map constant (reflect padding); with
  one channel per GroupNorm group (32 channels) each norm's input gradient
  would be 1000x its spatial variation, compounding (without
  ``layers.constant_map_grads``: max |grad| ~1e16 here, 1e17 / NaN at the
  runlocal size). The other tokenizers do not guard (zero padding)."""
  cfg = mini_model()
  model = models.build(cfg)
  params = np_init(abstract_params(cfg))
  rand = jax.random.uniform(jax.random.key(3), (1, 32, 32, 3), minval=-1,
                            maxval=1)
  x = jnp.concatenate([rand, jnp.full_like(rand, -1.0),
                       jnp.full_like(rand, 0.3)])

  def loss(p, x):
    recon, aux = model.apply({"params": p}, x)
    return jnp.mean(jnp.abs(x - recon)) + 1e-2 * aux["kl"]

  grad = jax.device_get(jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(
      params, x[:, None]))   # NumPy from here: no program per leaf shape
  per_image = np.stack([np.abs(g.reshape(3, -1)).max(axis=1)
                        for g in jax.tree_util.tree_leaves(grad)]).max(0)
  assert np.all(np.isfinite(per_image))
  assert per_image[1:].max() < 100 * per_image[0], per_image
  # Exact, not just finite: along a random direction the black image's
  # gradient equals the plain GroupNorm's forward-mode derivative (forward
  # mode meets no 1000x factor), and the random image's gradient is the
  # plain one (to rounding: the compiled program differs).
  leaves = jax.tree_util.tree_leaves
  rng = np.random.default_rng(5)
  v = jax.tree_util.tree_map(
      lambda a: rng.normal(size=a.shape).astype(np.float32), params)
  along = sum(float(np.vdot(g[1], t)) for g, t in zip(leaves(grad), leaves(v)))
  with mock.patch.object(layers, "GroupNorm", nn.GroupNorm):
    plain_along = float(jax.jit(lambda p, t: jax.jvp(
        lambda q: loss(q, x[1:2]), (p,), (t,))[1])(params, v))
    plain = jax.jit(jax.grad(loss))(params, x[:1])
  assert along == pytest.approx(plain_along, rel=1e-3), (along, plain_along)
  for g, want in zip(leaves(grad), leaves(plain)):
    np.testing.assert_allclose(g[0], want, rtol=1e-4, atol=1e-6)


def test_bad_inputs_name_the_fix(tiny):
  _, model, params = tiny
  with pytest.raises(ValueError, match="multiple of the token width 16"):
    model.apply({"params": params}, jnp.zeros((1, 32, 40, 3)), method="encode")
  with pytest.raises(ValueError, match="resolution 32"):
    model.apply({"params": params}, jnp.zeros((1, 48, 64, 3)), method="encode")
  # uint8 bytes were encoded as values up to 255, without a word.
  with pytest.raises(TypeError, match="float images, got uint8.*bytes_to_unit"):
    model.apply({"params": params}, jnp.zeros((1, 32, 64, 3), jnp.uint8),
                method="encode")


def test_paper_param_counts():
  cfg = eq_tok_config.get_config().model
  shapes = jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.key(0))
  n = {k: models.count_params(v) for k, v in shapes.items()}
  assert n == {"encoder": 86_050_816, "decoder": 121_548_547,
               "quant_layer": 3_145_984, "post_quant_layer": 3_149_824,
               "semantic_decoder": 46_420_480}
  # Spec (paper): encoder 86.1M, decoder 121.5M, quant / post-quant 3.1M.
  assert [round(n[k] / 1e6, 1) for k in ("encoder", "decoder", "quant_layer",
                                          "post_quant_layer")] == [86.1, 121.5,
                                                                   3.1, 3.1]
  enc = shapes["encoder"]
  assert enc["encoder1d"]["kernel"].shape == (3, 4096, 4096)
  assert enc["conv_out"]["kernel"].shape == (3, 3, 512, 256)
  assert enc["down_0"]["downsample"]["conv"]["conv"]["kernel"].shape == (3, 3, 128, 32)
  assert set(enc["down_4"]) == {"block_0", "block_1", "attn_0", "attn_1"}
  assert set(shapes["decoder"]["up_4"]) >= {"attn_0", "attn_1", "attn_2", "upsample"}
  assert shapes["quant_layer"]["kernel"].shape == (3, 4096, 256)


@pytest.mark.parametrize("which", ["tokenizer", "dino_disc"])
def test_logical_axes_map_to_the_mesh(which):
  from configs import base
  from genvis_jax.core import sharding as shd
  cfg = tiny_model() if which == "tokenizer" else eq_tok_config.dino_disc(
      img_size=16, patch_size=8, dim=32, depth=2, num_heads=2, key_depths=(1,),
      image_size=16)
  boxed = jax.eval_shape(lambda k: models.init_params(cfg, k, boxed=True),
                         jax.random.key(0))
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  sh = shd.tree_shardings(boxed, mesh, base.DEFAULT_RULES)
  assert len(jax.tree_util.tree_leaves(sh)) == len(jax.tree_util.tree_leaves(
      nn.unbox(boxed)))


def test_official_tokenizer_parity():
  """The official-named fixture weights (tests/eq_parity.py) map 1:1 onto
  the tokenizer and reproduce the PyTorch outputs."""
  f = np.load(FIXTURE)
  params = fixture_params(f, "tok/")
  abstract = abstract_params(parity_tokenizer_config())
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)
  assert shapes(params) == shapes(abstract)            # names 1:1, layouts
  assert_tokenizer_parity(params, f)


def test_the_generators_tokenizer_holds_what_encode_and_decode_read():
  """``inference.decoder_params(encode=True)``, the Equivariant generator's
  frozen tokenizer: the encoder and decoder sides, not the semantic decoder
  (read by the tokenizer's own loss alone); without ``encode`` the decoder
  side only."""
  from genvis_jax.models import inference   # pylint: disable=import-outside-toplevel
  cfg = mini_model()
  cfg.semantic = True
  shapes = abstract_params(cfg)
  model = models.build(cfg)
  assert "semantic_decoder" in shapes
  both = inference.decoder_params(model, cfg, shapes, encode=True)
  assert set(both) == set(shapes) - {"semantic_decoder"}, sorted(both)
  assert set(inference.decoder_params(model, cfg, shapes)) == {
      "decoder", "post_quant_layer"}
