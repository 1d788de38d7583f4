"""Shared conv-tokenizer blocks (models/layers/resnet.py) and the official-name
rename tables of the converters that feed them."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import eq_tokenizer as eq_tok_config
from genvis_jax import convert, models
from genvis_jax.convert import eq as ceq
from genvis_jax.convert import fqgan as cfq
from genvis_jax.convert import llamagen_vq as clg
from genvis_jax.convert import maskgit_vqgan as cmg
from genvis_jax.errors import ConfigError
from genvis_jax.models.layers import resnet
from tests.official_keys import KeyShapes


def _np_conv(x, w, b, pad):
  """Stride-1 cross-correlation NHWC x HWIO after padding (pad, mode)."""
  k = w.shape[0]
  if pad:
    p, mode = pad
    x = np.pad(x, ((0, 0), p, p, (0, 0)), mode=mode)
  h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
  out = np.zeros((x.shape[0], h, wd, w.shape[3]))
  for i in range(h):
    for j in range(wd):
      out[:, i, j] = np.einsum("bhwc,hwco->bo", x[:, i:i + k, j:j + k], w)
  return out + b


def _np_group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  g = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(
      g.var((1, 2, 4), keepdims=True) + eps)
  return g.reshape(x.shape) * scale + bias


def _randomize(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.3,
      nn.unbox(params))


class _Conv(nn.Module):
  padding: str

  @nn.compact
  def __call__(self, x):
    return resnet.conv2d(x, 3, "conv", padding=self.padding)


# torch Conv2d(padding=1) / padding_mode="reflect" and TF SAME, as numpy pads.
_NP_PADS = {"torch": ((1, 1), "constant"), "same": ((1, 1), "constant"),
            "reflect": ((1, 1), "reflect")}


@pytest.mark.parametrize("padding", sorted(_NP_PADS))
def test_conv_padding_modes_match_numpy(padding):
  x = np.random.default_rng(0).normal(size=(1, 5, 6, 2)).astype(np.float32)
  mod = _Conv(padding)
  p = _randomize(mod.init(jax.random.key(0), x)["params"], 1)
  y = mod.apply({"params": p}, x)
  want = _np_conv(x, p["conv"]["kernel"], p["conv"]["bias"], _NP_PADS[padding])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_bad_options_name_the_choices():
  x = jnp.zeros((1, 4, 4, 32))
  with pytest.raises(ConfigError, match="reflect"):
    _Conv("zeros").init(jax.random.key(0), x)
  with pytest.raises(ConfigError, match="shortcut_from.*input"):
    resnet.ResnetBlock(64, shortcut_from="nin").init(jax.random.key(0), x)


def test_resnet_block_reflect_input_shortcut_matches_numpy():
  # Equivariant / LlamaGen form: the 1x1 shortcut reads the block input.
  x = np.random.default_rng(2).normal(size=(2, 4, 5, 32)).astype(np.float32)
  block = resnet.ResnetBlock(64, padding="reflect")
  p = _randomize(block.init(jax.random.key(0), x)["params"], 3)
  assert set(p) == {"norm1", "conv1", "norm2", "conv2", "shortcut"}
  y = block.apply({"params": p}, x)
  silu = lambda t: t / (1 + np.exp(-t))
  pad = ((1, 1), "reflect")
  h = silu(_np_group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"]))
  h = _np_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"], pad)
  h = silu(_np_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"]))
  h = _np_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"], pad)
  want = _np_conv(x, p["shortcut"]["kernel"], p["shortcut"]["bias"], None) + h
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4)


def test_upsample_is_nearest_then_conv():
  x = np.random.default_rng(4).normal(size=(1, 2, 3, 4)).astype(np.float32)
  mod = resnet.Upsample("torch")
  p = _randomize(mod.init(jax.random.key(0), x)["params"], 5)
  y = mod.apply({"params": p}, x)
  up = x.repeat(2, axis=1).repeat(2, axis=2)       # torch "nearest", x2
  want = _np_conv(up, p["conv"]["kernel"], p["conv"]["bias"],
                  ((1, 1), "constant"))
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def _family_levels():
  from genvis_jax.models import llamagen_vq, maskgit_vqgan
  from genvis_jax.models.layers import resample
  return {
      "maskgit": lambda **kw: maskgit_vqgan.level(64, 2, resample="down", **kw),
      "llamagen": lambda **kw: resnet.Level(
          64, 2, attn=True, block_name="res",
          resample=("downsample", llamagen_vq.Downsample), **kw),
      "eq": lambda **kw: resample.level(64, 2, attn=True, resample="up",
                                        factors=(2, 1), **kw),
  }


@pytest.mark.parametrize("family,names,out_shape", [
    ("maskgit", {"block_0", "block_1"}, (2, 4, 4, 64)),
    ("llamagen", {"res_0", "attn_0", "res_1", "attn_1", "downsample"},
     (2, 4, 4, 64)),
    ("eq", {"block_0", "attn_0", "block_1", "attn_1", "upsample"},
     (2, 16, 8, 64)),
])
def test_one_level_serves_each_family_with_and_without_remat(family, names,
                                                             out_shape):
  """One ``Level`` serves the three CNNs with their names and resamplers;
  under remat it gives the same values and gradients."""
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 8, 32)),
                  jnp.float32)
  make = _family_levels()[family]
  plain, remat = make(), make(remat="full")
  assert plain == make()   # equal settings, equal (hashable) modules
  hash(plain)
  p = _randomize(jax.jit(plain.init)(jax.random.key(0), x)["params"], 7)
  assert set(p) == names
  y, pre = jax.jit(plain.apply)({"params": p}, x)
  assert y.shape == out_shape and pre.shape == (2, 8, 8, 64)

  # One program per module (run eagerly, each op compiles on its own).
  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grad(m, q):
    loss = lambda q: jnp.sum(jnp.square(m.apply({"params": q}, x, True)[0]))
    return m.apply({"params": q}, x)[0], jax.grad(loss)(q)
  (_, g0), (y1, g1) = out_and_grad(plain, p), out_and_grad(remat, p)
  # Two programs (remat or not) round differently: outputs are O(50), and
  # gradients a norm cancels (~0) keep a residue of the largest ones' size.
  np.testing.assert_allclose(y1, y, rtol=1e-5, atol=1e-4)
  big = max(float(np.abs(g).max()) for g in jax.tree.leaves(g0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * big), g0, g1)


def test_level_resample_is_a_name_and_a_module():
  with pytest.raises(ValueError, match=r"None or \(name, module class\)"):
    resnet.Level(32, 1, resample="down")
  with pytest.raises(ValueError, match="name, module class"):
    resnet.Level(32, 1, resample=(resnet.Upsample, "upsample"))
  from genvis_jax.models import maskgit_vqgan
  from genvis_jax.models.layers import resample
  for make in (lambda: maskgit_vqgan.level(32, 1, resample="Down"),
               lambda: resample.level(32, 1, attn=False, resample="Down")):
    with pytest.raises(ValueError, match="use None, 'down' or 'up'"):
      make()


# --- official names -> shared block names --------------------------------------

def test_each_family_renames_official_modules():
  w4, w1 = np.zeros((8, 4, 1, 1)), np.zeros((8,))
  mg = cmg.convert({
      "encoder.down.2.block.0.nin_shortcut.weight": w4,
      "decoder.up.4.upsample_conv.bias": w1})
  assert mg["encoder"]["down_2"]["block_0"]["shortcut"]["kernel"].shape == (1, 1, 4, 8)
  assert mg["decoder"]["up_4"]["upsample"]["conv"]["bias"].shape == (8,)
  key = "encoder.conv_blocks.1.res.0.nin_shortcut.weight"
  assert clg.convert({key: w4})["encoder"]["conv_blocks_1"][
      "res_0"]["shortcut"]["kernel"].shape == (1, 1, 4, 8)
  lists = clg.LISTS + cfq.OFFICIAL_ADAPTERS
  assert cfq.fqgan_leaf(key, w4, lists)[0] == (
      "encoder/conv_blocks_1/res_0/shortcut/kernel")
  assert cfq.fqgan_leaf("decoder.mid.1.q.weight", w4, lists)[0] == (
      "decoder/mid_1/q/kernel")
  # Equivariant: forward, and back to the official (dotted) names that the
  # Lightning EMA buffers are matched against.
  assert ceq.flax_leaf("encoder.down.2.block.0.nin_shortcut.bias", w1)[0] == (
      "encoder/down_2/block_0/shortcut/bias")
  assert "encoder.down.2.block.0.nin_shortcut.weight" in ceq.official_names(
      ("encoder", "down_2", "block_0", "shortcut", "kernel"))


def _eq_official_shapes(m):
  """Official tokenizer keys/shapes (EquivariantModeling's LDM-style Encoder /
  Decoder with (un)shuffle resamplers, the 1-D convs and the semantic decoder
  whose third block per level is never called), from the ddconfig alone."""
  s = KeyShapes()
  conv, norm, res, attn = s.conv, s.norm, s.resnet_block, s.attn_block

  def mid(p, c):
    res(p + ".mid.block_1", c, c), attn(p + ".mid.attn_1", c)
    res(p + ".mid.block_2", c, c)

  ch, mult, nrb, n = m.ch, tuple(m.ch_mult), m.num_res_blocks, len(m.ch_mult)
  groups = lambda i: 4 if i < m.len_down_scale else 2   # (2, 2) or (2, 1)
  hl = m.resolution // 2 ** (n - 1)
  feat = m.z_channels * hl
  conv("encoder.conv_in", ch, 3)
  c = ch
  for i in range(n):
    for j in range(nrb):
      res(f"encoder.down.{i}.block.{j}", c, ch * mult[i])
      c = ch * mult[i]
      if m.resolution // 2 ** i in m.attn_resolutions:
        attn(f"encoder.down.{i}.attn.{j}", c)
    if i != n - 1:
      conv(f"encoder.down.{i}.downsample.conv.conv", c // groups(i), c)
  mid("encoder", c), norm("encoder.norm_out", c)
  conv("encoder.conv_out", m.z_channels, c)
  conv("encoder.encoder1d", feat, feat, dims=1)
  conv("quant_layer", m.embed_dim, feat, dims=1)
  conv("post_quant_layer", feat, m.embed_dim, dims=1)
  conv("decoder.decoder1d", feat, feat, dims=1)
  conv("decoder.conv_in", c, m.z_channels)
  mid("decoder", c)
  for i in reversed(range(n)):
    for j in range(nrb + 1):
      res(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
      c = ch * mult[i]
      if m.resolution // 2 ** i in m.attn_resolutions:
        attn(f"decoder.up.{i}.attn.{j}", c)
    if i != 0:
      conv(f"decoder.up.{i}.upsample.conv.conv", c * groups(i - 1), c)
  norm("decoder.norm_out", c), conv("decoder.conv_out", 3, c)
  sc = m.semantic_ch
  sem = (*m.semantic_ch_mult, m.semantic_out // sc)
  c = ch * mult[-1]                       # the tapped decoder map ("res")
  for i in range(len(m.semantic_ch_mult)):
    for j in range(m.semantic_res_blocks + 1):
      res(f"semantic_decoder.down.{i}.block.{j}", c, sc * sem[i + 1])
      c = sc * sem[i + 1]
  norm("semantic_decoder.norm_out", c)
  conv("semantic_decoder.conv_out", m.semantic_out, c)
  return s


def test_eq_paper_official_key_list_converts_one_to_one():
  cfg = eq_tok_config.get_config().model
  shapes = _eq_official_shapes(models.build(cfg))   # every field, resolved
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, v) for k, v in shapes.items()}
  params = convert.from_torch("eq_tokenizer", state, cfg)   # raises on any gap
  count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(t))
  # The paper's sizes (specs): the unused semantic blocks are all that is dropped.
  assert {k: count(v) for k, v in params.items()} == {
      "encoder": 86_050_816, "decoder": 121_548_547, "quant_layer": 3_145_984,
      "post_quant_layer": 3_149_824, "semantic_decoder": 46_420_480}
  dropped = sum(int(np.prod(v)) for k, v in shapes.items() if ".block.2." in k
                and k.startswith("semantic_decoder."))
  assert count(params) + dropped == sum(int(np.prod(v)) for v in shapes.values())
  assert params["encoder"]["down_2"]["block_0"]["shortcut"]["kernel"].shape == (
      1, 1, 128, 256)
