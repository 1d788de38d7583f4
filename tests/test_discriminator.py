"""PatchGAN discriminator shapes / parameter count, its train-mode BatchNorm,
the DINO discriminator's per-replica BatchNormLocal and 'area' resize, and GAN
loss values."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import eq_tokenizer as eq_tok_config
from configs import fqgan_dual_ds16
from genvis_jax import models
from genvis_jax.models import dino_disc, patchgan
from genvis_jax.models.layers import images as images_lib
from genvis_jax.train import losses


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(name="patchgan", image_size=256, ndf=64,
                                     n_layers=3, norm="group"))
  c.update(kw)
  return c


def test_patchgan_shapes_and_param_count():
  shapes = jax.eval_shape(lambda r: models.init_params(_cfg(), r),
                          jax.random.key(0))
  # taming NLayerDiscriminator(ndf=64, n_layers=3): 2,765,633 parameters.
  assert models.count_params(shapes) == 2_765_633
  assert "bias" not in shapes["conv_1"] and "bias" in shapes["conv_4"]
  model = models.build(_cfg())
  out = jax.eval_shape(lambda p: model.apply({"params": p},
                                             jnp.zeros((2, 256, 256, 3))), shapes)
  assert out.shape == (2, 30, 30, 1)


def test_patchgan_runs_without_norm():
  cfg = _cfg(image_size=32, ndf=8, n_layers=2, norm="none")
  params = models.init_params(cfg, jax.random.key(0))
  assert "bias" in params["conv_1"] and "norm_1" not in params
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  out = models.build(cfg).apply({"params": params}, x)
  assert out.shape == (2, 6, 6, 1)  # 32 -> 16 -> 8 -> 7 -> 6 and bool(jnp.isfinite(out).all())
  with pytest.raises(ValueError, match="norm"):
    models.init_params(_cfg(norm="layer", image_size=32), jax.random.key(0))


def _np_train_bn(x, scale, bias, eps=1e-5):
  """torch BatchNorm2d in train mode on one (N, H, W, C) batch."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=(0, 1, 2))
  var = ((x - mean) ** 2).mean(axis=(0, 1, 2))          # biased
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_patchgan_batch_norm_is_per_group_train_mode_bn():
  """norm="batch": each group of ``group_size`` consecutive images is
  normalised with its own statistics (the official per-GPU BatchNorm2d in
  train mode), so 64 images equal each 32-image half run alone."""
  norm = patchgan.GroupBatchNorm(group_size=32)
  x = jax.random.normal(jax.random.key(0), (64, 3, 3, 256)) * 2.0 + 0.5
  p = norm.init(jax.random.key(1), x[:1])["params"]
  scale = np.asarray(nn.unbox(p["scale"]))
  bias = np.asarray(nn.unbox(p["bias"]))
  # The official _init_weights: weight ~ N(1, 0.02), bias 0.
  assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
  assert np.all(bias == 0)
  y = np.asarray(norm.apply({"params": p}, x))
  want = np.concatenate([_np_train_bn(x[:32], scale, bias),
                         _np_train_bn(x[32:], scale, bias)])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  whole = np.asarray(
      patchgan.GroupBatchNorm(group_size=0).apply({"params": p}, x))
  np.testing.assert_allclose(whole, _np_train_bn(x, scale, bias), rtol=1e-4,
                             atol=1e-4)
  with pytest.raises(ValueError, match="group_size"):
    norm.apply({"params": p}, x[:48])

  cfg = _cfg(image_size=8, ndf=4, n_layers=1, norm="batch", group_size=32)
  params = _jit_init(cfg, jax.random.key(2))
  assert set(params["norm_1"]) == {"scale", "bias"}
  assert "bias" not in params["conv_1"]
  apply = _jit_apply(models.build(cfg))
  imgs = jax.random.uniform(jax.random.key(3), (64, 8, 8, 3), minval=-1,
                            maxval=1)
  out = np.asarray(apply(params, imgs))
  halves = [np.asarray(apply(params, imgs[i:i + 32])) for i in (0, 32)]
  np.testing.assert_allclose(out, np.concatenate(halves), rtol=1e-5, atol=1e-6)
  one_group = models.build(_cfg(image_size=8, ndf=4, n_layers=1, norm="batch",
                                group_size=64))
  assert not np.allclose(out, _jit_apply(one_group)(params, imgs), atol=1e-4)


def _jit_init(cfg, key):
  """``models.init_params`` as one program (eagerly, each op of the init
  compiles on its own: hundreds of programs)."""
  return jax.jit(lambda k: models.init_params(cfg, k))(key)


def _jit_apply(model):
  """``(params, x) -> model's forward`` as one program per input shape."""
  return jax.jit(lambda params, x: model.apply({"params": params}, x))


def test_paper_configs_use_the_official_discriminator_statistics():
  fq = fqgan_dual_ds16.get_config()
  assert (fq.disc.norm, fq.disc.group_size) == ("batch", 32)
  assert fq.train.global_batch_size % fq.disc.group_size == 0
  eq = eq_tok_config.get_config()
  assert eq.disc.replica_batch == 12 and eq.train.global_batch_size % 12 == 0


def _np_batch_norm_local(x, virtual_bs, eps=1e-6):
  """The official BatchNormLocal (no affine) on one GPU's (b, L, C) batch."""
  x = np.asarray(x, np.float64)
  g = int(np.ceil(x.shape[0] / virtual_bs))
  y = x.reshape(g, -1, *x.shape[1:])
  mean = y.mean(axis=(1, 2), keepdims=True)
  var = y.var(axis=(1, 2), keepdims=True)
  return ((y - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_dino_batch_norm_local_per_replica():
  """replica_batch=12: a global batch of 24 = two GPUs of 12 images, each
  split into ceil(12 / 8) = 2 groups of 6 (not 3 groups of 8)."""
  x = jax.random.normal(jax.random.key(0), (24, 5, 4)) * 3.0 - 1.0
  bn = dino_disc.BatchNormLocal(virtual_bs=8, replica_batch=12)
  p = bn.init(jax.random.key(1), x)
  y = np.asarray(bn.apply(p, x))
  want = np.concatenate([_np_batch_norm_local(x[:12], 8),
                         _np_batch_norm_local(x[12:], 8)])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      np.asarray(dino_disc.BatchNormLocal(virtual_bs=8).apply(p, x)),
      _np_batch_norm_local(x, 8), rtol=1e-4, atol=1e-4)   # 0: one replica
  with pytest.raises(ValueError, match="replica_batch"):
    bn.apply(p, x[:18])

  cfg = eq_tok_config.dino_disc(img_size=16, patch_size=8, dim=16, depth=1,
                                 num_heads=2, key_depths=(0,), head_kernel=3,
                                 image_size=16)
  assert cfg.replica_batch == 12
  apply = _jit_apply(models.build(cfg))
  params = _jit_init(cfg, jax.random.key(2))
  imgs = jax.random.uniform(jax.random.key(3), (24, 16, 16, 3), minval=-1,
                            maxval=1)
  out = np.asarray(apply(params, imgs))
  halves = [np.asarray(apply(params, imgs[i:i + 12])) for i in (0, 12)]
  np.testing.assert_allclose(out, np.concatenate(halves), rtol=1e-4, atol=1e-5)


def test_dino_heads_do_not_depend_on_the_spectral_estimate():
  """Torch keeps a power-iteration vector between calls (one iteration per
  call); ours restarts from a fixed one. The estimates of sigma differ, the
  heads' logits and gradients do not: BatchNormLocal cancels the scale of
  the C x C convolutions, and the C -> 1 kernel's norm is exact at once."""
  feats = jax.random.normal(jax.random.key(0), (8, 16, 32)) * 2.0 + 0.5
  heads = {n: dino_disc.DiscHead(kernel_size=3, iterations=n) for n in (1, 50)}
  params = nn.unbox(jax.jit(heads[1].init)(jax.random.key(1), feats))["params"]
  k = params["res_conv"]["kernel"]
  normalize = jax.jit(dino_disc.spectral_normalize, static_argnums=1)
  s1, s50 = (np.abs(np.asarray(k / normalize(k, n))).max() for n in (1, 50))
  assert s1 < 0.97 * s50           # one iteration underestimates sigma
  @functools.partial(jax.jit, static_argnums=0)
  def out(n, params):
    f = lambda p: heads[n].apply({"params": p}, feats)
    return f(params), jax.grad(lambda p: jnp.sum(jnp.sin(f(p))))(params)
  (y1, g1), (y50, g50) = out(1, params), out(50, params)
  np.testing.assert_allclose(y1, y50, rtol=1e-4, atol=1e-5)
  # (The C x C biases get zero gradients, up to rounding: BN cancels them.)
  big = max(np.abs(g).max() for g in jax.tree_util.tree_leaves(g50))
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g50)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * big)


def _np_adaptive_avg_pool(x, out_h, out_w):
  """torch adaptive_avg_pool2d (= F.interpolate 'area') on (B, H, W, C)."""
  b, h, w, c = x.shape
  y = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    h0, h1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
    for j in range(out_w):
      w0, w1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


@pytest.mark.parametrize("in_hw,out_hw", [((32, 32), (28, 28)),
                                          ((20, 9), (14, 13)),
                                          ((6, 6), (6, 6))])
def test_dino_area_resize_is_adaptive_average_pooling(in_hw, out_hw):
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, *in_hw, 3)))
  y = np.asarray(images_lib.resize_area(jnp.asarray(x), *out_hw))
  np.testing.assert_allclose(y, _np_adaptive_avg_pool(x, *out_hw), rtol=1e-5,
                             atol=1e-6)
  if in_hw == out_hw:
    np.testing.assert_array_equal(images_lib.area_matrix(6, 6), np.eye(6))
  if in_hw == (32, 32):   # the discriminator's input path (256 -> 224 at scale)
    imgs = jnp.asarray(x[..., :3].clip(-1, 1))
    norm = (((x.clip(-1, 1) + 1) / 2
             - np.asarray(images_lib.IMAGENET_MEAN, np.float32))
            / np.asarray(images_lib.IMAGENET_STD, np.float32))
    np.testing.assert_allclose(np.asarray(dino_disc.preprocess(imgs, 28)),
                               _np_adaptive_avg_pool(norm, 28, 28),
                               rtol=1e-5, atol=1e-5)
  m = images_lib.area_matrix(256, 224)
  np.testing.assert_allclose(m.sum(1), 1.0)
  assert np.count_nonzero(m[0]) == 2 and np.count_nonzero(m[6]) == 2


def test_gan_loss_values():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.5])
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake),
                             0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3))
  np.testing.assert_allclose(losses.hinge_g_loss(fake), -(-0.5) / 3, rtol=1e-6)
  sp = lambda v: np.log1p(np.exp(v))
  np.testing.assert_allclose(
      losses.non_saturating_d_loss(real, fake),
      0.5 * (sp(-np.asarray(real)).mean() + sp(np.asarray(fake)).mean()),
      rtol=1e-6)
  np.testing.assert_allclose(losses.non_saturating_g_loss(fake),
                             sp(-np.asarray(fake)).mean(), rtol=1e-6)
  d_fn, g_fn = losses.gan_losses("hinge")
  assert d_fn is losses.hinge_d_loss and g_fn is losses.hinge_g_loss
  with pytest.raises(ValueError, match="GAN loss"):
    losses.gan_losses("wgan")
