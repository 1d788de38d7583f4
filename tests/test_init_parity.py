"""Initialisation of the models trained from scratch against the official
code's: what each PyTorch module starts from, restated here.

The official LlamaGen / FQGAN VQ and Equivariant tokenizers set no init of
their own (only the codebook's), so every ``nn.Conv2d`` / ``nn.Conv1d`` /
``nn.Linear`` keeps PyTorch's default, ``kaiming_uniform_(a=sqrt(5))``: a
kernel U(+-1/sqrt(fan_in)) (std 1/sqrt(3 fan_in)) and a bias
U(+-1/sqrt(fan_in)). FQGAN's heads are open_clip blocks of
``nn.MultiheadAttention`` (xavier-uniform ``in_proj``, zero biases, the
Linear default on ``out_proj`` with its bias zeroed) and ``nn.Linear``
MLPs. taming's PatchGAN draws its kernels from N(0, 0.02) and keeps the
default biases. MaskGIT's VQGAN is a JAX model: flax's lecun-normal kernels
and zero biases.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from genvis_jax import models
from genvis_jax.models import dino_disc


def _leaves(params):
  return {jax.tree_util.keystr(path): np.asarray(v, np.float64)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _fan_in(kernel):
  return int(np.prod(kernel.shape[:-1]))


def _assert_torch_default(name, kernel, bias):
  """kernel ~ U(+-b), bias ~ U(+-b), b = 1/sqrt(fan_in)."""
  bound = 1.0 / np.sqrt(_fan_in(kernel)) * (1 + 1e-6)   # float32 draws
  assert np.abs(kernel).max() <= bound, name
  assert kernel.std() / bound == pytest.approx(3 ** -0.5, rel=0.1), name
  assert np.abs(bias).max() <= bound and bias.any(), name
  if bias.size >= 64:   # random, not zero (a few draws: only bounded)
    assert bias.std() / bound == pytest.approx(3 ** -0.5, rel=0.35), name


def _convs(leaves):
  """(path, kernel, bias) of every conv (kernel of 3 or 4 dims)."""
  out = []
  for name, k in leaves.items():
    if name.endswith("['kernel']") and k.ndim >= 3:
      out.append((name, k, leaves.get(name[:-len("['kernel']")] + "['bias']")))
  return out


@pytest.mark.parametrize("spec", ["vq_ds16", "fqgan_dual_ds16", "eq_tokenizer"])
def test_pytorch_tokenizers_start_from_pytorchs_default(spec):
  """Were flax's lecun normal (1.73x the std) and zero biases."""
  import importlib  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{spec}").get_config("runlocal")
  leaves = _leaves(models.init_params(config.model, jax.random.key(0)))
  convs = _convs(leaves)
  assert len(convs) > 20
  for name, kernel, bias in convs:
    assert bias is not None, name     # every conv of these has a bias
    _assert_torch_default(name, kernel, bias)


def test_fqgan_heads_start_as_open_clip_blocks_in_pytorch():
  from configs import fqgan_dual_ds16  # pylint: disable=import-outside-toplevel
  config = fqgan_dual_ds16.get_config("runlocal")
  leaves = _leaves(models.init_params(config.model, jax.random.key(0)))
  heads = [n[:-len("['attn']['qkv']['kernel']")] for n in leaves
           if n.endswith("['attn']['qkv']['kernel']")]
  m = config.model
  assert len(heads) == (len(m.branches) * m.adapter_layers
                        + len(m.feat_heads) * m.feat_layers)
  for h in heads:
    qkv = leaves[h + "['attn']['qkv']['kernel']"]
    d_in, d_out = qkv.shape   # in_proj (3d, d) in torch: xavier over both
    assert np.abs(qkv).max() <= np.sqrt(6 / (d_in + d_out)), h
    assert qkv.std() == pytest.approx(np.sqrt(2 / (d_in + d_out)), rel=0.1)
    for b in ("['attn']['qkv']['bias']", "['attn']['out']['bias']"):
      assert not leaves[h + b].any(), h + b
    out = leaves[h + "['attn']['out']['kernel']"]
    bound = 1 / np.sqrt(out.shape[0]) * (1 + 1e-6)
    assert np.abs(out).max() <= bound
    assert out.std() / bound == pytest.approx(3 ** -0.5, rel=0.1)
    for fc in ("fc1", "fc2"):
      _assert_torch_default(h + fc, leaves[h + f"['mlp']['{fc}']['kernel']"],
                            leaves[h + f"['mlp']['{fc}']['bias']"])
  # The feature head's upscale Linears (8 -> width: N(0, 0.02) was a tenth
  # of the official std).
  for name in ("upscale_0", "upscale_2"):
    p = f"['feat_pred_head']['{name}']"
    _assert_torch_default(name, leaves[p + "['kernel']"], leaves[p + "['bias']"])


def test_discriminators_keep_pytorchs_default_biases():
  from configs import fqgan_dual_ds16  # pylint: disable=import-outside-toplevel
  config = fqgan_dual_ds16.get_config("runlocal")
  leaves = _leaves(models.init_params(config.disc, jax.random.key(0)))
  biased = [(n, k, b) for n, k, b in _convs(leaves) if b is not None]
  assert len(biased) == 2   # the first and the last conv
  for name, kernel, bias in biased:
    assert kernel.std() == pytest.approx(0.02, rel=0.1), name  # weights_init
    bound = 1 / np.sqrt(_fan_in(kernel))
    assert np.abs(bias).max() <= bound and bias.any(), name
  # The DINO discriminator's heads: nn.Conv1d (spectral norm divides the
  # kernel's scale out of the forward, not out of its updates).
  x = np.zeros((2, 7, 96), np.float32)
  conv = dino_disc.SNConv1d(384, 9)
  p = _leaves(nn.unbox(conv.init(jax.random.key(0), x)["params"]))
  _assert_torch_default("SNConv1d", p["['kernel']"], p["['bias']"])


def test_maskgit_vqgan_keeps_flaxs_default():
  from configs import maskgit_vqgan  # pylint: disable=import-outside-toplevel
  config = maskgit_vqgan.get_config("runlocal")
  leaves = _leaves(models.init_params(config.model, jax.random.key(0)))
  for name, kernel, bias in _convs(leaves):
    assert kernel.std() * np.sqrt(_fan_in(kernel)) == pytest.approx(
        1.0, rel=0.1), name
    assert bias is None or not bias.any(), name
