"""Equivariant converters: from_torch on the official-named parity fixture, the
Lightning EMA layout (dot-free ``ema_*`` buffers) and mismatch reports."""

import jax
import numpy as np
import pytest

from genvis_jax import convert, errors
from genvis_jax.convert import eq as ceq
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError
from tests.eq_parity import (FIXTURE, assert_tokenizer_parity, fixture_state,
                             parity_tokenizer_config)


@pytest.fixture(scope="module")
def tok():
  f = np.load(FIXTURE)
  return f, fixture_state(f, "tok/")


def lightning_ema(state):
  """The official Lightning layout: raw weights, LitEma buffers with the dots
  removed (distinct values, so a mix-up shows), its decay / num_updates, loss
  modules, and the never-used semantic ``down.0.block.2``."""
  out = {k: v + 1.0 for k, v in state.items()}           # raw, not EMA
  for k, v in state.items():
    module, _, rest = k.partition(".")
    out[f"ema_{module}.{rest.replace('.', '')}"] = v
  for module in {k.partition(".")[0] for k in state}:
    out[f"ema_{module}.decay"] = np.float32(0.99)
    out[f"ema_{module}.num_updates"] = np.int32(7)
  unused = "semantic_decoder.down.0.block.2.conv1.weight"
  out[unused] = np.zeros((32, 32, 3, 3), np.float32)
  out["ema_semantic_decoder.down0block2conv1weight"] = out[unused]
  out["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)
  return out


def test_official_names_cover_list_and_attribute_readings():
  assert ceq.official_names(("encoder", "mid", "block_1", "norm1", "scale")) == [
      "encoder.mid.block_1.norm1.weight", "encoder.mid.block.1.norm1.weight"]
  assert ceq.flax_leaf("encoder.down.4.attn.0.q.weight",
                       np.zeros((4, 3, 1, 1)))[0] == "encoder/down_4/attn_0/q/kernel"


def test_from_torch_reproduces_official_outputs(tok):
  f, state = tok
  params = convert.from_torch("eq_tokenizer", state, parity_tokenizer_config())
  assert_tokenizer_parity(params, f)


def test_ema_buffers_convert_to_identical_params(tok):
  _, state = tok
  cfg = parity_tokenizer_config()
  plain = convert.from_torch("eq_tokenizer", state, cfg)
  ema = convert.from_torch("eq_tokenizer", lightning_ema(state), cfg)
  same = jax.tree_util.tree_map(np.array_equal, plain, ema)
  assert all(jax.tree_util.tree_leaves(same))
  # Without ema_ keys the plain keys are used (here: the +1 raw weights).
  raw = {k: v for k, v in lightning_ema(state).items() if not k.startswith("ema_")}
  shifted = convert.from_torch("eq_tokenizer", raw, cfg)
  np.testing.assert_array_equal(shifted["decoder"]["conv_in"]["bias"],
                                plain["decoder"]["conv_in"]["bias"] + 1.0)


def test_mismatch_lists_keys(tok):
  _, state = tok
  bad = dict(state)
  del bad["decoder.conv_in.bias"]
  bad["decoder.extra.weight"] = np.zeros((3,), np.float32)
  bad["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    convert.from_torch("eq_tokenizer", bad, parity_tokenizer_config())
  msg = str(err.value)
  assert "decoder/conv_in/bias" in msg and "decoder/extra" in msg
  assert "encoder/conv_in/kernel" in msg
  # An EMA buffer the model lacks keeps its official name in the report.
  ema = lightning_ema(state)
  ema["ema_decoder.bogusweight"] = np.zeros((3,), np.float32)
  with pytest.raises(CheckpointMismatchError, match="ema_decoder.bogusweight"):
    convert.from_torch("eq_tokenizer", ema, parity_tokenizer_config())


def test_generator_kind_matches_parity_tree():
  """from_torch("eq_generator") gives the tree the generator parity test runs
  (test_eq_generator.py), and rejects the tokenizer's weights."""
  import ml_collections
  f = np.load(FIXTURE)
  cfg = ml_collections.ConfigDict(dict(
      name="eq_generator", hidden_size=32, depth=2, num_heads=4, head_width=24,
      head_depth=2, token_dim=8, num_classes=5, num_cond_tokens=3, window=3,
      seq_len=10))
  state = fixture_state(f, "gen/")
  params = convert.from_torch("eq_generator", state, cfg)
  want = ceq.official_to_flax(state)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
  np.testing.assert_array_equal(params["class_emb"]["embedding"],
                                state["class_emb.weight"])
  report = r"missing \(85\).*class_emb/embedding(.|\n)*unexpected.*decoder/conv_in"
  with pytest.raises(CheckpointMismatchError, match=report):
    convert.from_torch("eq_generator", fixture_state(f, "tok/"), cfg)
  # The released generator is a 30-class Places model: another class count
  # names the override, not a wall of mis-shaped keys.
  cfg.num_classes = 30
  with pytest.raises(errors.ConfigError,
                     match=r"has 5 classes \(class_emb.weight \(5, 32\)\), "
                           r"the config 30: .*--config.model.num_classes=5"):
    convert.from_torch("eq_generator", state, cfg)
