"""The shared attention and MLP layers against plain numpy statements."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.models.layers import attention as attn_lib
from genvis_jax.models.layers import mlp as mlp_lib

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


def test_windowed_attention_paths_agree_in_bf16():
  """mask="window" runs the kernel dispatcher (here its banded XLA version),
  or the dense attention when a mask is passed (or probabilities drop out).
  In bf16 both take bf16 probabilities times bf16 values with fp32 sums, so
  they agree up to summation order (fp32 probabilities on one path and bf16
  on the other made ~40% of these outputs differ)."""
  x = jax.random.normal(jax.random.key(0), (2, 48, 64))
  mod = attn_lib.Attention(4, mask="window", window=3, tokens_per_column=2,
                           attn_impl="reference", dtype=jnp.bfloat16)
  p = mod.init(jax.random.key(1), x)
  p = jax.tree_util.tree_map(lambda a: a * 20, p)   # O(1) logits and outputs
  kernel = np.asarray(mod.apply(p, x).astype(jnp.float32))
  dense = np.asarray(mod.apply(p, x, mask=jnp.ones((48, 48), bool))
                     .astype(jnp.float32))
  assert np.mean(kernel != dense) < 0.05


def test_dense_attention_is_the_kernels_reference():
  from genvis_jax.kernels import attention as kernel_attention
  from genvis_jax.kernels.windowed_attention import reference as ref
  assert attn_lib.dot_product_attention is kernel_attention.dot_product_attention
  assert ref.MASK_VALUE == kernel_attention.MASK_VALUE


def test_precomputed_kv_equals_cross_attention(data):
  """kv(context) once, then kv=: the cross-attention over the context
  (QK-norm on k, RoPE on the queries only)."""
  x, ctx = data
  mod = attn_lib.Attention(H, qk_norm=True)
  rope = attn_lib.rope_tables(jnp.arange(N) + 3, D // H)
  p = _random_params(mod, x, ctx, rope=rope)
  want = mod.apply({"params": p}, x, ctx, rope=rope)
  kv = mod.apply({"params": p}, ctx, method="kv")
  assert kv[0].shape == (B, 3, H, D // H)
  got = mod.apply({"params": p}, x, rope=rope, kv=kv)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  ref = _np_reference(jax.device_get(p), x, ctx, np.ones((N, 3), bool),
                      fused=False, qk_norm=True, rope=rope)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_rolling_window_cache_decoding_equals_windowed_attention(data):
  """One position at a time through a cache of ``window`` slots (positions
  wrap around it): the windowed causal attention of the whole sequence."""
  x, _ = data
  w, hd = 2, D // H
  mod = attn_lib.Attention(H, mask="window", window=w, attn_impl="reference")
  cos, sin = attn_lib.rope_tables(jnp.arange(N), hd)
  p = _random_params(mod, x, rope=(cos, sin))
  full = mod.apply({"params": p}, x, rope=(cos, sin))
  cache = (jnp.zeros((B, w, H, hd)),) * 2
  steps = []
  for pos in range(N):
    out, cache = mod.apply({"params": p}, x[:, pos:pos + 1],
                           rope=(cos[pos:pos + 1], sin[pos:pos + 1]),
                           cache_pos=pos, window_cache=cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match="one position per call"):
    mod.apply({"params": p}, x[:, :2], cache_pos=0, window_cache=cache)
  causal = attn_lib.Attention(H, mask="causal")
  with pytest.raises(ValueError, match="needs mask='window'"):
    causal.apply({"params": p}, x[:, :1], cache_pos=0, window_cache=cache)
  # Columns of two tokens are not what the cache decodes (it gave other
  # outputs than the full forward, silently).
  columns = attn_lib.Attention(H, mask="window", window=w, tokens_per_column=2)
  with pytest.raises(ValueError, match="tokens_per_column=2"):
    columns.apply({"params": p}, x[:, :1], cache_pos=0, window_cache=cache)


def _np_silu(a):
  return a / (1 + np.exp(-a))


def test_mlp_plain_and_gated_match_numpy(data):
  x, _ = data
  lin = lambda p, name, t: t @ np.asarray(p[name]["kernel"]) + np.asarray(
      p[name]["bias"])
  plain = mlp_lib.Mlp(24, activation="silu")
  p = _random_params(plain, x)
  np.testing.assert_allclose(
      plain.apply({"params": p}, x),
      lin(p, "fc2", _np_silu(lin(p, "fc1", x))), rtol=1e-5, atol=1e-5)
  gated = mlp_lib.Mlp(24, out=8, activation="silu", gated=True)
  p = _random_params(gated, x)
  assert set(p) == {"fc1_g", "fc1_x", "fc2"}
  want = lin(p, "fc2", _np_silu(lin(p, "fc1_g", x)) * lin(p, "fc1_x", x))
  got = gated.apply({"params": p}, x)
  assert got.shape == (B, N, 8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mlp_hidden_dropout_off_drops_only_the_output(data):
  """hidden_dropout=0 (LlamaGen FeedForward): the train output is the eval
  output with whole output entries dropped and the rest scaled by 1/keep."""
  x, _ = data
  mod = mlp_lib.Mlp(24, gated=True, activation="silu", dropout=0.5,
                    hidden_dropout=0.0)
  p = _random_params(mod, x)
  ev = np.asarray(mod.apply({"params": p}, x))
  tr = np.asarray(mod.apply({"params": p}, x, train=True,
                            rngs={"dropout": jax.random.key(5)}))
  kept = tr != 0
  assert 0.2 < kept.mean() < 0.8
  np.testing.assert_allclose(tr[kept], 2 * ev[kept], rtol=1e-5, atol=1e-6)
  both = mlp_lib.Mlp(24, gated=True, activation="silu", dropout=0.5)
  tr2 = np.asarray(both.apply({"params": p}, x, train=True,
                              rngs={"dropout": jax.random.key(5)}))
  assert not np.allclose(tr2[tr2 != 0], 2 * ev[tr2 != 0], rtol=1e-3)


def test_kv_cache_misuse_is_named(data):
  """The cache serves causal self-attention; a windowed or full mask, a cache
  without room or positions past its end are errors, not silent results."""
  x, _ = data
  for kind in ("none", "window"):
    mod = attn_lib.Attention(H, mask=kind, window=2, cache_len=N)
    p = _random_params(mod, x)
    with pytest.raises(ValueError, match="causal self-attention"):
      mod.apply({"params": p}, x[:, :2], cache_pos=0, mutable=["cache"])
  mod = attn_lib.Attention(H, mask="causal")
  p = _random_params(mod, x)
  with pytest.raises(ValueError, match="set the attention's cache_len"):
    mod.apply({"params": p}, x[:, :2], cache_pos=0, mutable=["cache"])
  mod = attn_lib.Attention(H, mask="causal", cache_len=4)
  with pytest.raises(ValueError, match=r"Positions 3..4 do not fit .* of 4"):
    mod.apply({"params": p}, x[:, :2], cache_pos=3, mutable=["cache"])


def test_kv_cache_takes_an_extra_batch_mask(data):
  """A (B, 1, N, M) mask on top of the cache's own (here: hide key 0 of the
  second sample) equals the same mask on full causal attention."""
  x, _ = data
  mod = attn_lib.Attention(H, mask="causal", cache_len=N)
  p = _random_params(mod, x)
  extra = np.ones((B, 1, N, N), bool)
  extra[1, :, 1:, 0] = False
  full = mod.apply({"params": p}, x, mask=extra)
  cached, _ = mod.apply({"params": p}, x, cache_pos=0, mask=extra,
                        mutable=["cache"])
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
  # One query (the decode-step path, which drops the query axis) with its
  # row of the mask.
  _, vs = mod.apply({"params": p}, x[:, :-1], cache_pos=0, mask=extra[:, :, :-1],
                    mutable=["cache"])
  last, _ = mod.apply({"params": p, **vs}, x[:, -1:], cache_pos=N - 1,
                      mask=extra[:, :, -1:], mutable=["cache"])
  np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
