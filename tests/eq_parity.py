"""The official Equivariant parity fixture (``tests/fixtures/eq_parity.npz``:
a reduced tokenizer and generator with their official-named float32 weights,
inputs and the PyTorch outputs), shared by the tokenizer, generator and
converter tests."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genvis_jax import models
from genvis_jax.convert.eq import official_to_flax

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "eq_parity.npz")


def fixture_params(f, prefix):
  return official_to_flax(fixture_state(f, prefix))


def fixture_state(f, prefix):
  """The fixture's official-named float32 weights of ``prefix`` ("tok/", "gen/")."""
  p = prefix + "param/"
  return {k[len(p):]: f[k].astype(np.float32) for k in f.files if k.startswith(p)}


def parity_tokenizer_config():
  """The reduced official tokenizer of the fixture (2-px columns)."""
  return ml_collections.ConfigDict(dict(
      name="eq_tokenizer", ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
      attn_resolutions=(4,), resolution=16, z_channels=4, embed_dim=8,
      len_down_scale=1, semantic=True, semantic_ch=32, semantic_ch_mult=(1,),
      semantic_out=32, semantic_res_blocks=1))


def assert_tokenizer_parity(params, f):
  """Encode / decode / semantic decode of the fixture images match torch."""
  model = models.build(parity_tokenizer_config())

  @jax.jit
  def run(params, x):
    mean = model.apply({"params": params}, x, method="encode")
    return (mean,) + model.apply({"params": params}, mean, method="decode_all")

  mean, recon, sem = run(params, jnp.asarray(f["tok/images"]))
  rel = lambda a, b: float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())
  assert mean.shape == (2, 12, 8)                       # 2-px columns
  assert rel(mean, f["tok/mean"]) < 1e-5
  assert rel(recon, f["tok/recon"]) < 1e-5
  assert rel(sem, f["tok/semantic"]) < 1e-5
