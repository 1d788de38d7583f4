"""Every dropout site of the generators, with its rate, against the official
blocks. Two dropout keys giving two outputs (the models' own tests) holds
while any one site is left; here each site is named, with distinct rates
(projection 0.1, attention probabilities 0.2, tokens 0.3) so that swapped
rates show too. Traced only (``jax.eval_shape``): no compile."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax.models.eq_generator import EqGenerator
from genvis_jax.models.far import FAR
from genvis_jax.models.rar import RAR


def dropout_sites(model, *args, **kwargs):
  """{path of the module holding the Dropout: sorted rates} of every Dropout
  that drops in ``model.apply(..., train=True)``."""
  sites = collections.defaultdict(list)

  def spy(f, args_, kwargs_, ctx):
    m = ctx.module
    if isinstance(m, nn.Dropout) and ctx.method_name == "__call__":
      if m.rate > 0 and not kwargs_.get("deterministic", m.deterministic):
        sites["/".join(m.scope.path[:-1])].append(m.rate)
    return f(*args_, **kwargs_)

  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
  with nn.intercept_methods(spy):
    jax.eval_shape(lambda p: model.apply({"params": p}, *args, train=True,
                                         rngs={"dropout": jax.random.key(1)},
                                         **kwargs), params)
  return {k: sorted(v) for k, v in sites.items()}


def test_rar():
  """modeling/rar.py Block: Attention's attn_drop and proj_drop, timm's
  Mlp(drop=proj_drop) after both of its layers."""
  m = RAR(hidden_size=32, depth=2, num_heads=2, mlp_dim=64, codebook_size=16,
          num_classes=4, seq_len=4, max_pos=8, num_timesteps=8, dropout=0.1,
          attn_dropout=0.2)
  got = dropout_sites(m, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2,), jnp.int32))
  assert got == {**{f"blocks_{i}/attn": [0.1, 0.2] for i in range(2)},
                 **{f"blocks_{i}/mlp": [0.1, 0.1] for i in range(2)}}


def test_far():
  """FQGAN autoregressive/models/far_dual.py: token dropout on the inputs;
  in the backbone's and the head's blocks, attention's attn_dropout_p and
  resid_dropout, and the feed-forward's ffn_dropout after w2 only."""
  m = FAR(num_codebooks=2, codebook_size=16, num_classes=4, grid=2, dim=32,
          n_layer=1, n_head=2, n_head_layer=1, ffn_dim=64, dropout=0.1,
          token_dropout=0.3, attn_dropout=0.2)
  got = dropout_sites(m, jnp.zeros((2, 2, 4), jnp.int32), jnp.zeros((2,), jnp.int32))
  want = {"": [0.3]}
  for block in ("layers_0", "ar_head_0"):
    want[f"{block}/attention"] = [0.1, 0.2]
    want[f"{block}/feed_forward"] = [0.1]
  assert got == want


def test_eq_generator():
  """generator/equ_modeling.py: attn_drop and proj_drop in the self- and the
  cross-attention, timm's Mlp(drop=proj_drop). Attention dropout also means
  the dense path, not the windowed kernel (which has none)."""
  m = EqGenerator(hidden_size=32, depth=1, num_heads=2, token_dim=4,
                  num_classes=4, num_cond_tokens=2, window=2, head_width=8,
                  head_depth=1, attn_dropout=0.2, proj_dropout=0.1)
  got = dropout_sites(m, jnp.zeros((2, 4, 4)), jnp.zeros((2,), jnp.int32),
                      jnp.zeros((2, 1, 4, 4)), jnp.ones((2, 1, 4)))
  assert got == {"encoder_blocks_0/attn": [0.1, 0.2],
                 "encoder_blocks_0/cross_attn": [0.1, 0.2],
                 "encoder_blocks_0/mlp": [0.1, 0.1]}
