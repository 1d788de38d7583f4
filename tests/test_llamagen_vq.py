"""LlamaGen VQ: shapes (ds16/ds8 tiny), round trip, official layout and sizes,
downsample padding, attention, normalised codebook init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import vq_ds8, vq_ds16
from genvis_jax import models
from genvis_jax.models import llamagen_vq as lg
from genvis_jax.models.layers import resnet
from genvis_jax.models.quantizers import VectorQuantizer
from tests.test_eq_tokenizer import np_init

HW = 32


def _tiny(channel_mult):
  return ml_collections.ConfigDict(dict(
      name="llamagen_vq", image_size=HW, hidden_channels=32,
      channel_mult=channel_mult, num_res_blocks=1, decoder_res_blocks=1,
      z_channels=32, num_codes=64, code_dim=8, l2_norm=True, commitment_cost=0.5,
      dtype="float32",
      param_dtype="float32"))


@pytest.mark.parametrize("channel_mult,grid", [((1, 1, 1, 1, 1), 2),
                                               ((1, 1, 1, 1), 4)])
def test_tiny_ds16_ds8_shapes(channel_mult, grid):
  cfg = _tiny(channel_mult)
  model = models.build(cfg)
  images = jnp.zeros((2, HW, HW, 3))

  def run(rng, x):
    params = models.init_params(cfg, rng)
    recon, aux = model.apply({"params": params}, x)
    codes = model.apply({"params": params}, x, method="encode")
    return recon, aux, codes, model.apply({"params": params}, codes,
                                          method="decode")

  recon, aux, codes, decoded = jax.eval_shape(run, jax.random.key(0), images)
  assert recon.shape == decoded.shape == images.shape
  assert recon.dtype == decoded.dtype == jnp.float32
  assert codes.shape == aux["codes"].shape == (2, grid, grid)
  assert codes.dtype == jnp.int32


def test_round_trip_equals_quantized_reconstruction():
  cfg = _tiny((1, 1, 1))
  model = models.build(cfg)
  images = jax.random.uniform(jax.random.key(1), (2, HW, HW, 3), minval=-1.0)

  @jax.jit
  def run(params, x):
    recon, aux = model.apply({"params": params}, x)
    codes = model.apply({"params": params}, x, method="encode")
    return recon, aux, codes, model.apply({"params": params}, codes,
                                          method="decode")

  # Weights drawn on the host: the initialiser's compile is not what this
  # checks (the codebook's init: test_codebook_init_is_normalised).
  recon, aux, codes, decoded = run(np_init(jax.eval_shape(
      lambda r: models.init_params(cfg, r), jax.random.key(0))), images)
  assert codes.shape == (2, HW // 4, HW // 4) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 64
  np.testing.assert_array_equal(codes, aux["codes"])
  for k in ("quantizer_loss", "codebook_loss", "commitment_loss", "usage",
            "perplexity"):
    assert aux[k].shape == () and np.isfinite(float(aux[k])), k
  # The config's commitment cost (0.5, not the default 0.25) weighs the
  # commitment term; no entropy term by default.
  np.testing.assert_allclose(aux["quantizer_loss"],
                             aux["codebook_loss"] + 0.5 * aux["commitment_loss"], rtol=1e-6)
  # decode(encode(x)) is the clipped quantized reconstruction of __call__ (up
  # to the rounding of the straight-through sum zn + (z_q - zn)).
  assert float(decoded.min()) >= -1.0 and float(decoded.max()) <= 1.0
  np.testing.assert_allclose(decoded, jnp.clip(recon, -1, 1), atol=1e-4)
  assert float(jnp.std(recon)) > 0


@pytest.mark.parametrize("mod,expected", [(vq_ds16, 71_883_403),
                                          (vq_ds8, 70_109_835)])
def test_paper_parameter_count_and_official_layout(mod, expected):
  # Expected = official LlamaGen VQModel (tokenizer/tokenizer_image/vq_model.py)
  # counted from its shapes: encoder trunk (conv_in, 2 res/level, downsample
  # convs, 2 attn at the last level, mid res-attn-res) + norm_out + conv_out
  # 3x3 512->256, decoder (3 res/level, 3 attn at the first level, upsample
  # convs), quant_conv 256->8, codebook 16384x8, post_quant_conv 8->256.
  # VQ-16 = 71,883,403 (the "72M" of the LlamaGen paper).
  cfg = mod.get_config().model
  boxed = jax.eval_shape(lambda r: models.init_params(cfg, r, boxed=True),
                         jax.random.key(0))
  assert models.count_params(boxed) == expected
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  p = nn.unbox(boxed)
  last = len(cfg.channel_mult) - 1
  enc, dec = p["encoder"], p["decoder"]
  assert enc["conv_blocks_0"]["downsample"]["conv"]["kernel"].shape == (3, 3, 128, 128)
  assert enc[f"conv_blocks_{last}"]["attn_1"]["q"]["kernel"].shape == (1, 1, 512, 512)
  assert "shortcut" in enc[f"conv_blocks_{last}"]["res_0"]
  assert set(enc["mid_1"]) == {"norm", "q", "k", "v", "proj_out"}
  assert enc["conv_out"]["kernel"].shape == (3, 3, 512, 256)
  assert set(dec["conv_blocks_0"]) == {"res_0", "res_1", "res_2", "attn_0",
                                       "attn_1", "attn_2", "upsample"}
  assert "upsample" not in dec[f"conv_blocks_{last}"]
  assert p["quant_conv"]["kernel"].shape == (1, 1, 256, 8)
  assert p["quantize"]["embedding"].shape == (16384, 8)
  assert p["post_quant_conv"]["kernel"].shape == (1, 1, 8, 256)
  built = models.build(cfg)          # the config states only what differs
  assert built.entropy_weight == 0.0 and built.l2_norm


def _np_conv(x, w, b, stride):
  """Valid cross-correlation, NHWC x HWIO."""
  kh, kw = w.shape[:2]
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return out + b


def test_downsample_pads_bottom_right_then_stride_2():
  x = np.random.default_rng(0).normal(size=(1, 6, 6, 4)).astype(np.float32)
  mod = lg.Downsample()
  params = mod.init(jax.random.key(0), x)["params"]
  w = np.asarray(nn.unbox(params)["conv"]["kernel"])
  b = np.random.default_rng(1).normal(size=4).astype(np.float32)
  params = {"conv": {"kernel": w, "bias": b}}
  out = mod.apply({"params": params}, x)
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))   # torch F.pad (0, 1, 0, 1)
  np.testing.assert_allclose(out, _np_conv(xp, w, b, 2), rtol=1e-4, atol=1e-5)
  assert out.shape == (1, 3, 3, 4)


def test_attention_block_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 32)).astype(np.float32)
  mod = resnet.AttnBlock()
  params = nn.unbox(mod.init(jax.random.key(0), x)["params"])
  params = jax.tree_util.tree_map(
      lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.2, params)
  out = np.asarray(mod.apply({"params": params}, x))
  # numpy reference: GroupNorm(32) over 32 channels = per-channel norm over hw.
  mu = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  y = (x - mu) / np.sqrt(var + 1e-6) * params["norm"]["scale"] + params["norm"]["bias"]
  proj = lambda n, t: t @ params[n]["kernel"][0, 0] + params[n]["bias"]
  q, k, v = (proj(n, y).reshape(2, 12, 32) for n in "qkv")
  logits = np.einsum("bnc,bmc->bnm", q, k) / np.sqrt(32)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  h = np.einsum("bnm,bmc->bnc", probs, v).reshape(2, 3, 4, 32)
  np.testing.assert_allclose(out, x + proj("proj_out", h), rtol=2e-4, atol=2e-4)


def test_codebook_init_is_normalised():
  # LlamaGen: uniform(+-1/n) then F.normalize, stored normalised.
  vq = VectorQuantizer(64, 8, l2_norm=True)
  e = vq.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]["embedding"]
  np.testing.assert_allclose(np.linalg.norm(np.asarray(nn.unbox(e)), axis=1),
                             1.0, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  cfg = _tiny((1, 1))
  model = models.build(cfg)
  params = jax.eval_shape(lambda r: models.init_params(cfg, r),
                          jax.random.key(0))
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 3, 32, 32)),
                                         method="encode"), params)
  with pytest.raises(ValueError, match=r"\(B, h, w\)"):
    jax.eval_shape(lambda p: model.apply({"params": p},
                                         jnp.zeros((1, 256), jnp.int32),
                                         method="decode"), params)
  # An image side the downsampling does not divide: a config error, as
  # MaskGIT's and the Equivariant tokenizer's.
  from genvis_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"Image size 31x32 is not divisible by "
                     r"the downsampling factor 2; .*config.data.image_size"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 31, 32, 3)),
                                         method="encode"), params)


def test_trains_through_fq_tokenizer_task():
  """The paper configs train the k = 1 tokenizer with the fq_tokenizer task;
  trace one gradient step abstractly (no compile)."""
  from configs import fqgan_demo
  from genvis_jax.train.tasks import fq_tokenizer as fqt
  c = fqgan_demo.fq_tokenizer_demo_config()
  c.model = _tiny((1, 1))
  c.model.image_size = c.data.image_size = c.disc.image_size = HW
  task = fqt.FQTokenizerTask(c)
  assert not task.use_rep and not task._has_features
  params = jax.eval_shape(lambda r: nn.unbox(task.init_params(r)),
                          jax.random.key(0))
  batch = {"image": jax.ShapeDtypeStruct((2, HW, HW, 3), jnp.float32)}
  grads, metrics = jax.eval_shape(task.grads, params, {}, batch,
                                  jax.random.key(1), jnp.zeros((), jnp.int32))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  for k in ("loss", "rec_loss", "quantizer_loss", "usage", "perplexity",
            "disc_loss"):
    assert metrics[k].shape == (), k
  assert "disentangle_loss" not in metrics
