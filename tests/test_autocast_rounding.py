"""bf16 compute rounds where torch autocast does (the official LlamaGen,
FQGAN, RAR and FAR training): matmuls and convs take bf16 operands and
return bf16; norms compute and return float32 (``layers.norm_dtype``), so
what follows a norm (swish, adaLN's modulate, a residual stream begun by
``ln_pre``) runs in float32 and the next matmul rounds once; GELU / SiLU
compute in float32 and round once, as torch's kernels; the attention scale
multiplies the float32 logits. Each test restates autocast's rounding and
compares what reaches a matmul. (Sums over the batch in float32:
test_bf16_reductions.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.models import layers
from genvis_jax.models.layers import attention as attn_lib
from genvis_jax.models.layers import mlp as mlp_lib
from genvis_jax.models.layers import resnet

BF = jnp.bfloat16


def _differ(a, b) -> float:
  """The fraction of elements of two bf16 arrays that differ."""
  return float(np.mean(np.asarray(a.astype(BF), np.float32)
                       != np.asarray(b.astype(BF), np.float32)))


def _capture(module_type, method="__call__"):
  """An interceptor recording the first argument of every call of a
  ``module_type`` module (not of its subclasses), by module name, and what
  it returned."""
  seen = {}

  def grab(f, args, kwargs, ctx):
    out = f(*args, **kwargs)
    if type(ctx.module) is module_type and ctx.method_name == method:
      seen[ctx.module.name] = (args[0], out)
    return out
  return seen, grab


def _layer_norm32(x, scale, bias, eps):
  x = x.astype(jnp.float32)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * scale + bias


def test_norms_return_float32_in_a_bf16_model():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32)).astype(BF)
  for make in (layers.group_norm, layers.layer_norm):
    for dtype, want in ((BF, jnp.float32), (jnp.float32, jnp.float32),
                        (None, jnp.float32)):
      norm = make(dtype=dtype)
      out = norm.apply(norm.init(jax.random.key(1), x), x)
      assert out.dtype == want, (make, dtype)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu"])
def test_activations_round_once_in_bf16(name):
  """torch's GELU / SiLU kernels compute a bf16 tensor in float32 and round
  once; jax's gelu in bf16 rounded each of its steps (35% differed)."""
  x = (3 * jax.random.normal(jax.random.key(0), (4096,))).astype(BF)
  fn = mlp_lib.activation(name)
  got = fn(x)
  assert got.dtype == BF
  assert _differ(got, fn(x.astype(jnp.float32))) == 0.0


def test_resnet_block_conv_inputs_round_once():
  """GN -> swish -> conv: GroupNorm returns float32 and swish runs in
  float32, so conv2's input is rounded once, at the conv (a bf16 GroupNorm
  rounded it two more times: 45% of the inputs differed)."""
  block = resnet.ResnetBlock(64, dtype=BF)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64))
  params = nn.unbox(block.init(jax.random.key(1), x)["params"])
  g = params["norm2"]
  g["scale"] = 1 + 0.3 * jax.random.normal(jax.random.key(2), (64,))
  g["bias"] = 0.3 * jax.random.normal(jax.random.key(3), (64,))
  seen, grab = _capture(layers.Conv)
  with nn.intercept_methods(grab):
    block.apply({"params": params}, x)
  h = seen["conv1"][1].astype(jnp.float32)        # bf16 conv output
  b, hh, ww, c = h.shape
  grouped = h.reshape(b, hh * ww, 32, c // 32)
  mu = grouped.mean((1, 3), keepdims=True)
  var = ((grouped - mu) ** 2).mean((1, 3), keepdims=True)
  gn = ((grouped - mu) / jnp.sqrt(var + 1e-6)).reshape(h.shape)
  gn = gn * g["scale"] + g["bias"]
  want = (gn * jax.nn.sigmoid(gn)).astype(BF)
  assert _differ(seen["conv2"][0], want) < 1e-3


def test_fqgan_adapter_stream_is_float32_in_bf16():
  """open_clip's ln_pre returns float32 under autocast, so the adapter's
  residual stream and ln_post's output are float32 (ours were bf16: 49-65%
  of its matmul inputs differed from autocast's)."""
  from genvis_jax.models import fqgan
  from genvis_jax.models.layers import vit
  adapter = fqgan.FactorizedAdapter(4, num_layers=2, num_heads=4, dtype=BF)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64)).astype(BF)
  params = adapter.init(jax.random.key(1), x)
  seen, grab = _capture(vit.Block)
  with nn.intercept_methods(grab):
    out = adapter.apply(params, x)
  assert [s[0].dtype for s in seen.values()] == [jnp.float32] * 2
  assert out.dtype == jnp.float32


def test_rar_block_rounds_the_modulated_input_once():
  """The qkv matmul takes modulate(LN(x)) computed in float32 and rounded
  once, as under autocast (LayerNorm returns float32; the adaLN Linear's
  shift and scale are bf16, 1 + scale too): bf16 norms rounded LN(x), the
  product and the sum again (35% of these inputs differed)."""
  from genvis_jax.models.layers.attention import FusedQKV
  from genvis_jax.models.rar import Block
  d = 64
  blk = Block(dim=d, num_heads=4, mlp_dim=4 * d, dtype=BF)
  kx, kc, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 16, d))
  c = 0.02 * jax.random.normal(kc, (2, 16, d))
  params = nn.unbox(blk.init(kp, x, c)["params"])
  mod = params["adaLN_modulation"]     # trained modulations are not zero
  mod["kernel"] = 2.0 * jax.random.normal(kp, mod["kernel"].shape)
  norm = params["norm1"]
  norm["scale"] = 1 + 0.1 * jax.random.normal(kc, (d,))
  norm["bias"] = 0.1 * jax.random.normal(kx, (d,))
  seen, grab = _capture(FusedQKV)
  with nn.intercept_methods(grab):
    blk.apply({"params": params}, x, c)
  m = (jax.nn.silu(c).astype(BF) @ mod["kernel"].astype(BF)
       + mod["bias"].astype(BF))
  shift, scale = m[..., :d], m[..., d:2 * d]
  ln = _layer_norm32(x, norm["scale"], norm["bias"], 1e-6)
  want = ln * (1 + scale) + shift
  # A few may round the other way (one-pass vs two-pass variance).
  assert _differ(seen["qkv"][0], want) < 1e-3


def test_attention_scales_the_float32_logits():
  """q reaches the softmax unscaled and the 1/sqrt(head_dim) scale multiplies
  the float32 logits, on every path: dense causal, KV-cache and rolling
  window-cache decoding, and the windowed kernels (which always did). At
  head_dim 80 (RAR-XL) q * scale on a bf16 q rounded q a second time: 49%
  of these outputs differed from the windowed kernel's."""
  n = 12
  x = jax.random.normal(jax.random.key(0), (2, n, 160))
  causal = attn_lib.Attention(2, mask="causal", dtype=BF, cache_len=n)
  window = attn_lib.Attention(2, mask="window", window=n,
                              attn_impl="reference", dtype=BF)
  p = causal.init(jax.random.key(1), x)
  p = jax.tree_util.tree_map(lambda a: a * 8, p)    # O(1) logits
  want = np.asarray(window.apply(p, x).astype(jnp.float32))
  dense = np.asarray(causal.apply(p, x).astype(jnp.float32))
  out, vs = causal.apply(p, x[:, :2], cache_pos=0, mutable=["cache"])
  steps = [out]
  for pos in range(2, n):
    out, vs = causal.apply({**p, **vs}, x[:, pos:pos + 1], cache_pos=pos,
                           mutable=["cache"])
    steps.append(out)
  cached = np.asarray(jnp.concatenate(steps, 1).astype(jnp.float32))
  cache, steps = (jnp.zeros((2, n, 2, 80), BF),) * 2, []
  for pos in range(n):
    out, cache = window.apply(p, x[:, pos:pos + 1], cache_pos=pos,
                              window_cache=cache)
    steps.append(out)
  rolling = np.asarray(jnp.concatenate(steps, 1).astype(jnp.float32))
  np.testing.assert_array_equal(dense, want)
  np.testing.assert_array_equal(cached, want)
  np.testing.assert_array_equal(rolling, want)


def test_vit_teachers_stream_is_float32_in_bf16():
  """HF DINOv2 / CLIP under autocast: cat(float32 class token, bf16 patches)
  and + the float32 position table promote, and LayerScale's float32 gamma
  keeps each branch float32, so the stream is float32 from the embedding
  on (ours was bf16: 37% of the first qkv inputs differed, and the teacher's
  CLS feature had twice autocast's error against float32)."""
  from genvis_jax.models import dinov2
  from genvis_jax.models.layers import vit
  model = dinov2.Dinov2Model(hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, image_size=28,
                             patch_size=14, dtype=BF)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  params = model.init(jax.random.key(1), x)
  seen, grab = _capture(vit.Block)
  ls, grab_ls = _capture(vit.LayerScale)
  with nn.intercept_methods(grab), nn.intercept_methods(grab_ls):
    model.apply(params, x)
  assert [s[0].dtype for s in seen.values()] == [jnp.float32] * 2
  assert {s[1].dtype for s in ls.values()} == {jnp.dtype(jnp.float32)}
