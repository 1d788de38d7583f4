"""The shared attention layer against a plain numpy statement of attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.models.layers import attention as attn_lib

B, N, D, H = 2, 6, 16, 4


def _np_attention(q, k, v, mask):
  """q (B, N, H, hd), k / v (B, M, H, hd), mask (N, M) -> (B, N, H, hd)."""
  logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhnm,bmhd->bnhd", p, v)


def _np_layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_reference(p, x, context, mask, *, fused, qk_norm=False, rope=None):
  """The module's documented computation written out in numpy."""
  lin = lambda name, t: t @ np.asarray(p[name]["kernel"]) + np.asarray(
      p[name]["bias"])
  heads = lambda t: t.reshape(*t.shape[:-1], H, -1)
  if fused:
    q, k, v = np.split(lin("qkv", x), 3, axis=-1)
  else:
    src = x if context is None else context
    q, k, v = lin("q", x), lin("k", src), lin("v", src)
  q, k, v = heads(q), heads(k), heads(v)
  if qk_norm:
    q = _np_layer_norm(q, *(np.asarray(p["q_norm"][n]) for n in ("scale", "bias")))
    k = _np_layer_norm(k, *(np.asarray(p["k_norm"][n]) for n in ("scale", "bias")))
  if rope is not None:
    q = np.asarray(attn_lib.apply_rope(jnp.asarray(q), *rope))
    if context is None:
      k = np.asarray(attn_lib.apply_rope(jnp.asarray(k), *rope))
  out = _np_attention(q, k, v, mask).reshape(*x.shape[:-1], D)
  return lin("out", out)


@pytest.fixture(scope="module")
def data():
  r = np.random.default_rng(0)
  return (r.normal(size=(B, N, D)).astype(np.float32),
          r.normal(size=(B, 3, D)).astype(np.float32))


def _random_params(module, *args, **kw):
  params = nn.unbox(module.init(jax.random.key(0), *args, **kw)["params"])
  # Non-trivial norms and biases so a swapped or skipped term shows.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("mask_kind,fused,qk_norm,use_rope", [
    ("none", True, False, False), ("causal", True, True, False),
    ("causal", False, False, True), ("window", True, False, True)])
def test_self_attention_matches_numpy(data, mask_kind, fused, qk_norm, use_rope):
  x, _ = data
  mod = attn_lib.Attention(H, fused_qkv=fused, qk_norm=qk_norm, mask=mask_kind,
                           window=2, attn_impl="reference")
  rope = attn_lib.rope_tables(jnp.arange(N), D // H) if use_rope else None
  p = _random_params(mod, x, rope=rope)
  got = mod.apply({"params": p}, x, rope=rope)
  i, j = np.arange(N)[:, None], np.arange(N)[None]
  mask = {"none": np.ones((N, N), bool), "causal": j <= i,
          "window": (j <= i) & (i - j < 2)}[mask_kind]
  want = _np_reference(jax.device_get(p), x, None, mask, fused=fused,
                       qk_norm=qk_norm, rope=rope)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cross_attention_matches_numpy(data):
  x, ctx = data
  mod = attn_lib.Attention(H, fused_qkv=True)  # cross always uses q / k / v
  p = _random_params(mod, x, ctx)
  assert set(p) == {"q", "k", "v", "out"}
  got = mod.apply({"params": p}, x, ctx)
  want = _np_reference(jax.device_get(p), x, ctx, np.ones((N, 3), bool),
                       fused=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_causal_attention(data):
  """Prefill 2 positions, then decode one at a time: the causal outputs."""
  x, _ = data
  mod = attn_lib.Attention(H, qk_norm=True, mask="causal", cache_len=N)
  p = _random_params(mod, x)
  full = mod.apply({"params": p}, x)
  out, vs = mod.apply({"params": p}, x[:, :2], cache_pos=0, mutable=["cache"])
  steps = [out]
  for pos in range(2, N):
    out, vs = mod.apply({"params": p, **vs}, x[:, pos:pos + 1], cache_pos=pos,
                        mutable=["cache"])
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5,
                             atol=1e-5)


def test_unknown_mask_is_named(data):
  x, _ = data
  with pytest.raises(ValueError, match="'diagonal' is not one of"):
    attn_lib.Attention(H, mask="diagonal").init(jax.random.key(0), x)
