"""Official MaskGIT VQGAN key layout -> Flax params (rename + transpose).

The official names/shapes are generated here from the spec (1d-tokenizer
``modeling/modules/maskgit_vqgan.py``: 168 keys), independently of the model code.
"""

import jax
import numpy as np
import pytest

from configs import maskgit_vqgan as paper_config
from genvis_jax import convert, models
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError
from genvis_jax.convert.maskgit_vqgan import convert as convert_maskgit_vqgan


def _block(prefix, c_in, c_out):
  keys = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
          f"{prefix}.conv1.weight": (c_out, c_in, 3, 3),
          f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
          f"{prefix}.conv2.weight": (c_out, c_out, 3, 3)}
  if c_in != c_out:
    keys[f"{prefix}.nin_shortcut.weight"] = (c_out, c_out, 1, 1)
  return keys


def _official_shapes(hidden=128, mult=(1, 1, 2, 2, 4), nrb=2, z=256, k=1024):
  s = {"encoder.conv_in.weight": (hidden, 3, 3, 3)}
  c = hidden
  for i, m in enumerate(mult):
    for j in range(nrb):
      s |= _block(f"encoder.down.{i}.block.{j}", c, hidden * m)
      c = hidden * m
  for j in range(nrb):
    s |= _block(f"encoder.mid.{j}", c, c)
  s |= {"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,),
        "encoder.conv_out.weight": (z, c, 1, 1), "encoder.conv_out.bias": (z,),
        "quantize.embedding.weight": (k, z),
        "decoder.conv_in.weight": (c, z, 3, 3), "decoder.conv_in.bias": (c,)}
  for j in range(nrb):
    s |= _block(f"decoder.mid.{j}", c, c)
  for i in reversed(range(len(mult))):
    for j in range(nrb):
      s |= _block(f"decoder.up.{i}.block.{j}", c, hidden * mult[i])
      c = hidden * mult[i]
    if i:
      s |= {f"decoder.up.{i}.upsample_conv.weight": (c, c, 3, 3),
            f"decoder.up.{i}.upsample_conv.bias": (c,)}
  s |= {"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,),
        "decoder.conv_out.weight": (3, c, 3, 3), "decoder.conv_out.bias": (3,)}
  return s


def test_paper_checkpoint_layout_converts_to_model_tree():
  shapes = _official_shapes()
  assert len(shapes) == 168
  rng = np.random.default_rng(0)
  state = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
  params = convert_maskgit_vqgan(state)
  want = jax.eval_shape(
      lambda r: models.init_params(paper_config.get_config().model, r),
      jax.random.key(0))
  assert (jax.tree_util.tree_structure(params)
          == jax.tree_util.tree_structure(want))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
                         params, want)
  w = state["encoder.down.2.block.0.conv1.weight"]
  np.testing.assert_array_equal(
      params["encoder"]["down_2"]["block_0"]["conv1"]["kernel"],
      w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["decoder"]["mid_1"]["norm2"]["scale"],
                                state["decoder.mid.1.norm2.weight"])
  np.testing.assert_array_equal(params["quantize"]["embedding"],
                                state["quantize.embedding.weight"])


def test_bad_keys_are_listed_in_one_report():
  """Keys of another model keep their names; a weight of the wrong rank
  lands on its path and is reported mis-shaped, all in one error."""
  state = {"model.conv.weight": np.zeros((1, 1, 1, 1), np.float32),
           "encoder.conv_in.weight": np.zeros((2, 2), np.float32)}
  params = convert_maskgit_vqgan(state)
  assert params["model.conv.weight"].shape == (1, 1, 1, 1)
  with pytest.raises(CheckpointMismatchError, match=r"(?s)missing \(\d+\): .*"
                     r"unexpected \(1\): model.conv.weight.*mis-shaped \(1\): "
                     r"encoder/conv_in/kernel expected \(3, 3, 3, 128\) found "
                     r"\(2, 2\)"):
    convert.from_torch("maskgit_vqgan", state, paper_config.get_config().model)
