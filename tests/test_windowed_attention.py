"""Windowed causal attention: semantics, banded XLA version, Pallas kernels.

The Pallas TPU and GPU kernels run in interpret mode on CPU (forward and the
custom-VJP backward kernels) and are lowered for TPU (Mosaic) and CUDA
(Triton) through ``jax.export``, which needs no accelerator.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.extend.core import jaxprs_in_params

from genvis_jax.kernels import windowed_causal_attention as wca
from genvis_jax.kernels.windowed_attention import reference as ref
from genvis_jax.kernels import windowed_attention as wa
from genvis_jax.kernels.windowed_attention import resolve_impl

# (seq, window, tokens_per_column, block_q, block_k): seq not a multiple of
# the blocks, window >= columns, T > 1 (power of two and not), window 1.
EDGE_CASES = [
    (37, 4, 1, 16, 16),
    (48, 3, 4, 16, 32),
    (20, 50, 2, 16, 16),
    (45, 2, 3, 32, 16),
    (20, 3, 1, 32, 16),     # TPU: block_q cut to the sequence (24), see _layout
]


def _random_cases(n_cases, seed=0):
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n_cases):
    t = int(rng.choice([1, 2, 3]))
    cols = int(rng.integers(5, 24))
    cases.append((cols * t, int(rng.integers(1, 7)), t,
                  int(rng.choice([16, 32])), int(rng.choice([16, 32]))))
  return cases


KERNEL_CASES = EDGE_CASES + _random_cases(2)


def _qkv(seq, seed=0, batch=2, heads=2, head_dim=16, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, (batch, seq, heads, head_dim), dtype)
          for k in keys]


def _assert_close(got, want, rtol=1e-5, floor=1e-6):
  """max |got - want| <= rtol * max |want| + floor (grads can be ~0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want))
  assert err <= rtol * np.max(np.abs(want)) + floor, (err, np.max(np.abs(want)))


def _value_and_grads(impl, q, k, v, do, **kw):
  """(out, dq, dk, dv) of one jitted forward + VJP."""
  @jax.jit
  def run(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: wca(q, k, v, impl=impl, **kw), q, k, v)
    return (out, *vjp(do))
  return run(q, k, v, do)


# ----------------------------------------------------------------------------
# Semantics.


def test_mask_matches_official_rule_for_one_token_per_column():
  # Official generator: j in [i - cond_length, i]; cond_length 3 = window 4.
  n, cond = 12, 3
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  official = (j <= i) & (j >= i - cond)
  np.testing.assert_array_equal(
      ref.window_mask(n, window=cond + 1, tokens_per_column=1), official)


def test_mask_is_full_within_column_and_counts_columns():
  m = ref.window_mask(12, window=2, tokens_per_column=3)  # 4 columns of 3
  assert m[0, 2]  # later token of the same column is visible
  assert m[5, 0] and not m[6, 2]  # column 1 sees column 0; column 2 does not
  np.testing.assert_array_equal(m.sum(1), [3] * 3 + [6] * 9)


def test_dense_attention_matches_explicit_softmax():
  q, k, v, _ = _qkv(10, head_dim=8)
  out = ref.dense_attention(q, k, v, window=3, scale=0.5)
  mask = ref.window_mask(10, window=3)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", p, v)
  _assert_close(out, want)


@pytest.mark.parametrize("seq,window,t,chunk", [
    (50, 4, 1, None), (48, 3, 4, 8), (30, 40, 3, None), (33, 1, 1, 16)])
def test_banded_equals_dense(seq, window, t, chunk):
  q, k, v, do = _qkv(seq, seed=seq)
  kw = dict(window=window, tokens_per_column=t)
  want = _value_and_grads("dense", q, k, v, do, **kw)
  got = _value_and_grads("reference", q, k, v, do, block_q=chunk, **kw)
  for g, w in zip(got, want):
    _assert_close(g, w)


def test_banded_memory_is_linear_in_sequence():
  c = ref.banded_chunk(4096, window=4, tokens_per_column=1)
  assert c <= 32  # logits are (N, 2C), not (N, N)
  assert ref.banded_chunk(4096, window=40, tokens_per_column=2) == 78


# ----------------------------------------------------------------------------
# Band geometry: exact and O(N x W).


@pytest.mark.parametrize("n,window,t,bq,bk", [
    (64, 4, 1, 16, 16), (96, 3, 4, 16, 32), (96, 2, 3, 32, 8),
    (48, 100, 2, 8, 16), (64, 1, 1, 8, 8)])
def test_block_spans_are_exactly_the_band_blocks(n, window, t, bq, bk):
  geom = dict(window=window, tokens_per_column=t, block_q=bq, block_k=bk,
              padded_len=n)
  mask = ref.window_mask(n, window=window, tokens_per_column=t)
  touched = mask.reshape(n // bq, bq, n // bk, bk).any(axis=(1, 3))
  from_q = np.zeros_like(touched)
  for qb in range(n // bq):
    first, count = ref.kv_block_span(qb, **geom)
    from_q[qb, first:first + count] = True
  from_k = np.zeros_like(touched)
  for kb in range(n // bk):
    first, count = ref.q_block_span(kb, **geom)
    from_k[first:first + count, kb] = True
  np.testing.assert_array_equal(from_q, touched)
  np.testing.assert_array_equal(from_k, touched)


def test_spans_agree_on_python_ints_and_traced_ints():
  geom = dict(window=3, tokens_per_column=3, block_q=16, block_k=8,
              padded_len=96)
  traced = jax.jit(lambda b: ref.kv_block_span(b, **geom))
  for b in range(6):
    assert tuple(map(int, traced(jnp.int32(b)))) == ref.kv_block_span(b, **geom)


def test_visited_key_blocks_grow_linearly():
  geom = dict(window=4, tokens_per_column=2, block_q=32, block_k=32)
  visited, widths = [], []
  for n in (256, 512, 1024, 2048):
    g = dict(geom, padded_len=n)
    visited.append(sum(ref.kv_block_span(b, **g)[1] for b in range(n // 32)))
    widths.append(ref.max_kv_blocks(**g))
  assert len(set(widths)) == 1 and widths[0] <= 2  # band of 8 tokens
  # Doubling N doubles the work (up to the first block), unlike dense (x4).
  assert all(abs(b - 2 * a) <= 1 for a, b in zip(visited, visited[1:]))
  assert visited[-1] <= 2 * 2048 // 32


def _pallas_grids(fn, *args):
  """Grids of the pallas_calls in fn's jaxpr, keyed by kernel name."""
  grids = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        name = eqn.params["name"]
        grids[name] = eqn.params["grid_mapping"].grid
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return grids


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_grids_are_banded(impl):
  def loss(n):
    x = jnp.zeros((1, n, 2, 16))
    f = lambda q, k, v: wca(q, k, v, window=4, impl=impl, block_q=16,
                            block_k=16).sum()
    return _pallas_grids(jax.grad(f, argnums=(0, 1, 2)), x, x, x)

  small, large = loss(128), loss(1024)
  assert set(small) == {"windowed_attention_fwd", "windowed_attention_dkv",
                        "windowed_attention_dq"}
  for name, grid in large.items():
    if impl == "pallas_tpu":  # (batch, heads, blocks, band steps)
      assert grid[:3] == (1, 2, 64) and grid[3] == small[name][3] == 2
    else:  # (blocks, batch, heads); the band loop is inside the kernel
      assert grid == (64, 1, 2)


# ----------------------------------------------------------------------------
# Pallas kernels (interpret mode) against the dense reference.


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_kernel_matches_reference(impl, case):
  seq, window, t, bq, bk = case
  q, k, v, do = _qkv(seq, seed=seq + window)
  kw = dict(window=window, tokens_per_column=t)
  want = _value_and_grads("dense", q, k, v, do, **kw)
  got = _value_and_grads(impl, q, k, v, do, block_q=bq, block_k=bk, **kw)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.all(np.isfinite(g)), name
    _assert_close(g, w)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_bf16_and_odd_head_dim(impl):
  q, k, v, _ = _qkv(40, head_dim=24, dtype=jnp.bfloat16)
  kw = dict(window=3, tokens_per_column=2, scale=0.3)
  got = wca(q, k, v, impl=impl, block_q=16, block_k=16, **kw)
  want = ref.dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
  assert got.dtype == jnp.bfloat16 and got.shape == q.shape
  _assert_close(got.astype(jnp.float32), want, rtol=2e-2)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_runs_on_each_devices_shard_under_a_mesh(impl, monkeypatch):
  """XLA cannot partition a Pallas call: under the trainer's mesh each device
  must run the kernel on its own rows (batch over data x fsdp, heads over
  tensor), not on the gathered global batch."""
  import importlib
  import flax.linen as nn
  from configs import base
  from jax.sharding import NamedSharding, PartitionSpec as P
  kernel = importlib.import_module(f"genvis_jax.kernels.windowed_attention.{impl}")
  seen = []
  forward = kernel.forward
  monkeypatch.setattr(kernel, "forward",
                      lambda q, *a: seen.append(q.shape) or forward(q, *a))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v, do = _qkv(24, batch=4, heads=2)
  kw = dict(window=3, tokens_per_column=2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(base.DEFAULT_RULES):
    spec = P(("data", "fsdp"), None, "tensor", None)
    q, k, v, do = (jax.device_put(x, NamedSharding(mesh, spec))
                   for x in (q, k, v, do))
    got = _value_and_grads(impl, q, k, v, do, block_q=16, block_k=16, **kw)
  # (B, H, N, D) on TPU, (B, N, H, D) on GPU: 1 row of 4, 1 head of 2.
  assert seen and all(s[0] == 1 and 1 in s[1:3] and 2 not in s[1:3]
                      for s in seen), seen
  assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)
  want = _value_and_grads("dense", *(np.asarray(x) for x in (q, k, v, do)),
                          **kw)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    _assert_close(g, w), name


def test_kernel_spec_splits_batch_and_heads_only_where_they_divide():
  import flax.linen as nn
  from configs import base
  from jax.sharding import PartitionSpec as P
  from genvis_jax.kernels.windowed_attention import kernel_spec
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with nn.logical_axis_rules(base.DEFAULT_RULES):
    assert kernel_spec((4, 16, 2, 8), mesh) == P(("data", "fsdp"), None,
                                                 "tensor", None)
    # batch 3 divides by no axis; 1 head by none either.
    assert kernel_spec((3, 16, 2, 8), mesh) == P(None, None, "tensor", None)
    assert kernel_spec((4, 16, 1, 8), mesh) == P(("data", "fsdp"), None, None,
                                                 None)
  # A table giving the batch every axis: tensor splits the batch only (a
  # mesh axis may split one dimension).
  every = tuple((k, ("data", "fsdp", "tensor") if k == "batch" else v)
                for k, v in base.DEFAULT_RULES)
  with nn.logical_axis_rules(every):
    assert kernel_spec((8, 16, 2, 8), mesh) == P(("data", "fsdp", "tensor"),
                                                 None, None, None)


def test_kernel_spec_without_a_rules_context_uses_the_package_table():
  """Traced under a mesh alone, the kernel splits as the one default table
  (core.sharding.DEFAULT_RULES, configs/base.py's) says, not by a copy."""
  import flax.linen as nn
  from genvis_jax.core import sharding
  from genvis_jax.kernels.windowed_attention import kernel_spec
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert not nn.get_logical_axis_rules()
  for shape in ((4, 16, 2, 8), (2, 16, 4, 8), (3, 16, 1, 8)):
    bare = kernel_spec(shape, mesh)
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
      assert bare == kernel_spec(shape, mesh), shape


# ----------------------------------------------------------------------------
# Lowering for the real targets (no accelerator needed).


@pytest.mark.parametrize("impl,platform,target", [
    ("pallas_tpu", "tpu", "tpu_custom_call"),
    ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("t", [1, 3])
def test_kernels_lower_for_their_platform(impl, platform, target, t):
  x = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)

  def loss(q, k, v):
    out = wca(q, k, v, window=4, tokens_per_column=t, impl=impl,
              interpret=False, block_q=64, block_k=128)
    return out.astype(jnp.float32).sum()

  with _target_device(platform):
    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
    )(x, x, x)
  assert exported.mlir_module().count(target) >= 3  # fwd, dkv, dq


def _target_device(platform: str):
  """The GPU the Triton lowering compiles for: from jax 0.11 it is read from
  the device (none on a CPU host) or an abstract mesh's device, so name an
  H100 (jax 0.10 ignores it; a jax without ``AbstractDevice`` gets none)."""
  if platform != "cuda" or not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                       num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


# ----------------------------------------------------------------------------
# Dispatch and errors.


def test_dispatch_falls_back_to_reference_on_cpu():
  assert resolve_impl("auto", backend="cpu") == "reference"
  assert resolve_impl("auto", backend="tpu") == "pallas_tpu"
  assert resolve_impl("auto", backend="gpu") == "pallas_gpu"
  q, k, v, _ = _qkv(24)
  auto = wca(q, k, v, window=4)
  np.testing.assert_array_equal(
      auto, ref.banded_attention(q, k, v, window=4, scale=0.25))
  # window=None is causal over columns.
  _assert_close(wca(q, k, v, window=None, tokens_per_column=2),
                ref.dense_attention(q, k, v, window=12, tokens_per_column=2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window"),
    (dict(window=2, tokens_per_column=5), "whole number of columns"),
    (dict(window=2, impl="flash"), r"config.model.attn_impl='flash'.*auto"),
    (dict(window=2, impl="pallas_gpu", block_q=24), "power-of-two"),
    (dict(window=2, impl="pallas_tpu", block_k=12), "multiples of 8"),
])
def test_bad_arguments_are_named(kwargs, match):
  q, k, v, _ = _qkv(24)
  with pytest.raises(ValueError, match=match):
    wca(q, k, v, **kwargs)
  with pytest.raises(ValueError, match="share one shape"):
    wca(q, k[:, :12], v, window=2)


@pytest.mark.parametrize("n,bq,bk", [(100, 128, 64), (200, 256, 128),
                                     (300, 512, 256), (20, 32, 16)])
def test_tiles_cut_to_a_short_sequence_pad_it_by_less_than_a_tile(n, bq, bk):
  # A tile cut to the sequence beside an uncut one: their lcm (104 beside 64
  # is 832) padded 100 tokens to 832.
  got_q, got_k, n_pad = wa._layout("pallas_tpu", n, bq, bk)
  assert got_q % 8 == 0 and got_k % 8 == 0
  assert n <= n_pad < n + max(got_q, got_k), (got_q, got_k, n_pad)
  # Tiles that fit the sequence are the user's, whatever their lcm.
  assert wa._layout("pallas_tpu", 1000, 96, 64) == (96, 64, 1152)


def test_pallas_gpu_refuses_tpu_interpret_params():
  from jax.experimental.pallas import tpu as pltpu
  q, k, v, _ = _qkv(16)
  with pytest.raises(ValueError, match="InterpretParams are pallas_tpu's"):
    wca(q, k, v, window=2, impl="pallas_gpu",
        interpret=pltpu.InterpretParams())


def test_unknown_impl_is_a_config_error():
  from genvis_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="config.model.attn_impl"):
    resolve_impl("flash")
