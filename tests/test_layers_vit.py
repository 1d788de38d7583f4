"""The shared ViT (models/layers/vit.py) against a numpy statement of a pre-norm
block, its embedding's errors and resize hook, and the parameter renaming."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from genvis_jax.convert import vit as cvit
from genvis_jax.models.layers import vit

B, N, D, H, MLP = 2, 5, 8, 2, 12


def _np_ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_block(p, x, eps, act, layerscale):
  """timm ``Block`` (pre-norm, fused qkv, optional LayerScale) in numpy."""
  lin = lambda q, t: t @ q["kernel"] + q["bias"]
  h = _np_ln(x, p["norm1"], eps)
  q, k, v = (t.reshape(B, N, H, -1) for t in np.split(lin(p["attn"]["qkv"], h), 3, -1))
  logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(D // H)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = lin(p["attn"]["out"], np.einsum("bhnm,bmhd->bnhd", w, v).reshape(B, N, D))
  x = x + (y * p["ls1"]["scale"] if layerscale else y)
  y = lin(p["mlp"]["fc2"], act(lin(p["mlp"]["fc1"], _np_ln(x, p["norm2"], eps))))
  return x + (y * p["ls2"]["scale"] if layerscale else y)


def _random(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: rng.normal(0.5, 0.5, s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("act,layerscale", [("gelu", None), ("quick_gelu", 0.1)])
def test_block_matches_numpy(act, layerscale):
  block = vit.Block(H, MLP, activation=act, norm_eps=1e-5, layerscale=layerscale)
  x = np.random.default_rng(1).normal(size=(B, N, D)).astype(np.float32)
  p = _random(nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x))["params"])
  assert ("ls1" in p) == (layerscale is not None)
  fns = {"gelu": lambda t: 0.5 * t * (1 + erf(t / np.sqrt(2))),
         "quick_gelu": lambda t: t / (1 + np.exp(-1.702 * t))}
  want = _np_block(jax.tree_util.tree_map(np.float64, p), x.astype(np.float64),
                   1e-5, fns[act], layerscale is not None)
  got = block.apply({"params": p}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_encoder_states_and_remat():
  enc = vit.Encoder(H, MLP, depth=2)
  x = jnp.ones((B, N, D))
  p = nn.unbox(enc.init(jax.random.key(0), x)["params"])
  assert set(p) == {"block_0", "block_1"}
  states = enc.apply({"params": p}, x)
  assert len(states) == 3 and states[0] is x
  again = vit.Encoder(H, MLP, depth=2, remat="full").apply({"params": p}, x)
  np.testing.assert_allclose(again[-1], states[-1], rtol=1e-6)
  with pytest.raises(ValueError, match="divisible by 3 heads"):
    vit.Encoder(3, MLP).init(jax.random.key(0), x)


def test_embed_tokens_resize_and_errors():
  emb = vit.Embed(D, 4, grid=2, mask_token=True,
                  resize=lambda pos, h, w: pos[:1 + (h // 4) * (w // 4)])
  x = jnp.ones((B, 8, 8, 3))
  p = nn.unbox(emb.init(jax.random.key(0), x)["params"])
  assert p["cls_token"].shape == (D,) and p["pos_embed"].shape == (5, D)
  tokens = emb.apply({"params": p}, x)
  np.testing.assert_allclose(tokens[:, 0], jnp.broadcast_to(
      p["cls_token"] + p["pos_embed"][0], (B, D)), rtol=1e-6)
  mask = jnp.array([[True, False, False, False]] * B)
  masked = emb.apply({"params": p}, x, mask)
  np.testing.assert_allclose(masked[:, 1], jnp.broadcast_to(
      p["mask_token"] + p["pos_embed"][1], (B, D)), rtol=1e-6)
  assert emb.apply({"params": p}, jnp.ones((B, 4, 8, 3))).shape == (B, 3, D)
  with pytest.raises(ValueError, match="num_patches"):
    emb.apply({"params": p}, x, mask[:, :2])
  fixed = vit.Embed(D, 4, grid=2)
  with pytest.raises(ValueError, match="use 8x8 images"):
    fixed.init(jax.random.key(0), jnp.ones((1, 12, 12, 3)))


def test_name_table_rules():
  names = cvit.Names(top={"patch.proj": "embed/patch_embed"}, blocks=r"blocks\.(\d+)",
                     block={"attn.proj": "attn/out"},
                     tensors={"cls": ("embed/cls_token", 1)},
                     block_tensors={"ls1.gamma": ("ls1/scale", 1)})
  w = np.arange(6.0).reshape(3, 2)
  assert cvit.leaf("blocks.7.attn.proj.weight", w, names)[0] == (
      "encoder/block_7/attn/out/kernel")
  np.testing.assert_array_equal(cvit.leaf("blocks.7.attn.proj.weight", w, names)[1], w.T)
  assert cvit.leaf("blocks.0.ls1.gamma", np.ones(3), names)[0] == "encoder/block_0/ls1/scale"
  assert cvit.leaf("cls", np.ones((1, 1, 3)), names)[1].shape == (3,)
  assert cvit.leaf("patch.proj.weight", np.ones((4, 3, 2, 2)), names)[1].shape == (2, 2, 3, 4)
  assert cvit.leaf("head.weight", w, names)[0] == "head.weight"   # unexpected
  with pytest.raises(ValueError, match="leading 1-sized"):
    cvit.leaf("cls", np.ones((2, 3)), names)
