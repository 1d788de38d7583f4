"""MaskGIT VQGAN: shapes, encode/decode round trip, quirks, parameter count, gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import maskgit_vqgan as paper_config
from genvis_jax import models
from genvis_jax.models import layers
from genvis_jax.models import maskgit_vqgan as mv
from genvis_jax.models.layers import resnet

HW = 16  # tiny: two levels -> 8x8 token grid


def _tiny_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      name="maskgit_vqgan", image_size=HW, hidden_channels=32,
      channel_mult=(1, 2), num_res_blocks=1, z_channels=32, num_codes=64,
      code_dim=32, commitment_cost=0.5, dropout=0.0, dtype="float32",
      param_dtype="float32", remat="none"))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def tiny():
  cfg = _tiny_config()
  model = models.build(cfg)
  params = jax.jit(lambda r: models.init_params(cfg, r))(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, HW, HW, 3))
  return cfg, model, params, images


def test_forward_encode_decode_shapes(tiny):
  _, model, params, images = tiny
  recon, aux = jax.jit(model.apply)({"params": params}, images)
  assert recon.shape == images.shape and recon.dtype == jnp.float32
  assert aux["codes"].shape == (2, HW // 2, HW // 2)
  assert aux["codes"].dtype == jnp.int32
  for k in ("quantizer_loss", "codebook_loss", "commitment_loss", "usage",
            "perplexity"):
    assert aux[k].shape == () and np.isfinite(float(aux[k])), k
  # The config's commitment cost (0.5 here, not the default) weighs the
  # commitment term; codebook and commitment terms are equal in value.
  np.testing.assert_allclose(aux["quantizer_loss"], 1.5 * aux["commitment_loss"], rtol=1e-6)
  np.testing.assert_allclose(aux["codebook_loss"], aux["commitment_loss"], rtol=1e-6)
  codes = jax.jit(functools.partial(model.apply, method="encode"))(
      {"params": params}, images)
  assert codes.shape == (2, HW // 2, HW // 2) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 64
  np.testing.assert_array_equal(codes, aux["codes"])
  out = jax.jit(functools.partial(model.apply, method="decode"))(
      {"params": params}, codes)
  assert out.shape == images.shape
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  # decode(encode(x)) is the clamped quantized reconstruction of __call__
  # (to the rounding of two compiled programs).
  np.testing.assert_allclose(out, jnp.clip(recon, 0, 1), atol=5e-5)


def test_logical_names_on_every_param(tiny):
  cfg = tiny[0]
  boxed = jax.eval_shape(
      lambda r: models.init_params(cfg, r, boxed=True), jax.random.key(0))
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


def test_same_padding_is_asymmetric_for_even_strided_input():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
  conv = layers.conv(3, 3, strides=2)
  p = conv.init(jax.random.key(1), x)
  y = conv.apply(p, x)
  k = p["params"]["kernel"].value
  def manual(pad):
    return jax.lax.conv_general_dilated(
        x, k, (2, 2), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # TF SAME: total pad 1 on an even input, all of it bottom/right.
  np.testing.assert_allclose(y, manual(((0, 1), (0, 1))), rtol=1e-5, atol=1e-5)
  assert not np.allclose(y, manual(((1, 0), (1, 0))), atol=1e-3)
  # 2x2 average-pool downsampling takes disjoint blocks (no padding).
  pooled = mv.avg_pool_2x2(x)
  np.testing.assert_allclose(pooled[0, 1, 2], x[0, 2:4, 4:6].mean((0, 1)),
                             rtol=1e-6)
  up = resnet.upsample_nearest_2x(pooled)
  np.testing.assert_array_equal(up[0, 2:4, 4:6], jnp.broadcast_to(
      pooled[0, 1, 2], (2, 2, 2)))
  with pytest.raises(ValueError, match="even"):
    mv.avg_pool_2x2(jnp.zeros((1, 5, 4, 1)))


def _group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean((1, 2, 4), keepdims=True)
  var = g.var((1, 2, 4), keepdims=True)
  return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _conv(x, k):
  pad = ((k.shape[0] // 2,) * 2,) * 2
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def test_resnet_block_applies_shortcut_to_post_conv2_features():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 32))
  block = resnet.ResnetBlock(64, **mv.RES_BLOCK)
  p = nn.unbox(jax.jit(block.init)(jax.random.key(1), x)["params"])
  assert p["shortcut"]["kernel"].shape == (1, 1, 64, 64)
  # Random norm affines so they are exercised too.
  keys = iter(jax.random.split(jax.random.key(2), 4))
  for n in ("norm1", "norm2"):
    p[n] = {k: jax.random.normal(next(keys), v.shape) for k, v in p[n].items()}
  y = jax.jit(block.apply)({"params": p}, x)

  @jax.jit
  def reference(p, x):
    h = jax.nn.silu(_group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"]))
    h = _conv(h, p["conv1"]["kernel"])
    h = jax.nn.silu(_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"]))
    h = _conv(h, p["conv2"]["kernel"])
    return h + _conv(h, p["shortcut"]["kernel"])
  np.testing.assert_allclose(y, reference(p, x), rtol=1e-4, atol=1e-4)
  # Same width: identity residual, no shortcut parameter.
  same = resnet.ResnetBlock(32, **mv.RES_BLOCK)
  ps = jax.jit(same.init)(jax.random.key(3), x)["params"]
  assert "shortcut" not in ps
  h2 = jax.jit(same.apply)({"params": ps}, x) - x
  assert float(jnp.abs(h2).max()) > 0


def test_paper_size_parameter_count():
  cfg = paper_config.get_config().model
  shapes = jax.eval_shape(lambda r: models.init_params(cfg, r),
                          jax.random.key(0))
  total = models.count_params(shapes) / 1e6
  assert abs(total - 54.5) < 0.05, total
  assert abs(models.count_params(shapes["encoder"]) / 1e6 - 23.8) < 0.05
  assert abs(models.count_params(shapes["decoder"]) / 1e6 - 30.5) < 0.05
  assert shapes["quantize"]["embedding"].shape == (1024, 256)
  # shortcut (official nin_shortcut) exactly where the checkpoint has them.
  enc = shapes["encoder"]
  dec = shapes["decoder"]
  assert {f"down_{i}" for i in range(5) if "shortcut" in
          enc[f"down_{i}"]["block_0"]} == {"down_2", "down_4"}
  assert {f"up_{i}" for i in range(5) if "shortcut" in
          dec[f"up_{i}"]["block_0"]} == {"up_1", "up_3"}
  assert "upsample" not in dec["up_0"] and "conv" in dec["up_4"]["upsample"]
  ex = models.example_inputs(cfg, 2)[0]
  assert ex.shape == (2, 256, 256, 3)


def _rec_loss(model, params, images):
  recon, aux = model.apply({"params": params}, images, train=True)
  return jnp.mean((recon - images) ** 2) + aux["quantizer_loss"]


def test_straight_through_gradient_reaches_encoder_and_remat_matches(tiny):
  cfg, model, params, images = tiny
  g = jax.jit(jax.grad(lambda p: _rec_loss(model, p, images)))(params)
  for path in (("encoder", "conv_in", "kernel"),
               ("encoder", "down_0", "block_0", "conv1", "kernel"),
               ("quantize", "embedding"), ("decoder", "conv_out", "kernel")):
    leaf = g
    for k in path:
      leaf = leaf[k]
    assert float(jnp.abs(leaf).max()) > 0, path
  remat = models.build(_tiny_config(remat="full"))
  g2 = jax.jit(jax.grad(lambda p: _rec_loss(remat, p, images)))(params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g2)


def test_bfloat16_compute_keeps_fp32_params_and_outputs(tiny):
  _, _, params, images = tiny
  model = models.build(_tiny_config(dtype="bfloat16"))
  recon, aux = jax.jit(model.apply)({"params": params}, images)
  assert recon.dtype == jnp.float32 and aux["quantizer_loss"].dtype == jnp.float32
  assert np.isfinite(np.asarray(recon)).all()
  bf_params = jax.eval_shape(
      lambda r: models.init_params(_tiny_config(dtype="bfloat16"), r),
      jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
      bf_params))


def test_bad_config_and_inputs_raise(tiny):
  with pytest.raises(ValueError, match="code_dim"):
    models.init_params(_tiny_config(code_dim=16), jax.random.key(0))
  _, model, params, _ = tiny
  with pytest.raises(ValueError, match="NHWC"):
    model.apply({"params": params}, jnp.zeros((1, 3, HW, HW)), method="encode")
  with pytest.raises(TypeError, match="float images, got uint8"):
    model.apply({"params": params}, jnp.zeros((1, HW, HW, 3), jnp.uint8),
                method="encode")
  with pytest.raises(ValueError, match=r"\(B, h, w\)"):
    model.apply({"params": params}, jnp.zeros((1, 64), jnp.int32),
                method="decode")


def test_sampling_holds_the_weights_decode_reads(tiny):
  """``inference.decoder_params``: the codebook and the decoder, not the
  encoder (with ``encode``, every weight of this model), and decode from
  them alone gives the same images;
  ``params_read`` keeps exactly the leaves a function consumes."""
  from genvis_jax.models import inference   # pylint: disable=import-outside-toplevel
  cfg, model, params, images = tiny
  held = inference.decoder_params(model, cfg, params)
  assert set(held) == {"quantize", "decoder"}, sorted(held)
  # With encode (the Equivariant generator encodes in its step): all here.
  both = inference.decoder_params(model, cfg, params, encode=True)
  assert jax.tree_util.tree_structure(both) == jax.tree_util.tree_structure(
      params)
  codes = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(
      params, images)
  dec = jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode"))
  np.testing.assert_array_equal(np.asarray(dec(held, codes)),
                                np.asarray(dec(params, codes)))
  tree = {"a": {"x": np.ones(2), "y": np.ones(3)}, "b": np.ones(4)}
  assert jax.tree_util.tree_map(np.shape, inference.params_read(
      lambda p: p["a"]["x"] * 2 + p["b"][:2], tree)) == {"a": {"x": (2,)},
                                                          "b": (4,)}
