"""models.config_fields: a model config's entries as module fields, strictly."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import pytest

from genvis_jax import models
from genvis_jax.errors import ConfigError, UserError
from genvis_jax.models import rar


class _Toy(nn.Module):
  widths: tuple = (1, 2)
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32
  label: str = "float32"
  mode: str = "a"


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(name="toy", **kw))


def test_fields_converted():
  out = models.config_fields(
      _cfg(widths=[3, [4, 5]], dtype="bfloat16", param_dtype="float32"), _Toy)
  assert out == {"widths": (3, (4, 5)), "dtype": jnp.dtype("bfloat16"),
                 "param_dtype": jnp.dtype("float32")}
  assert isinstance(out["widths"], tuple) and isinstance(out["widths"][1], tuple)
  hash(_Toy(**out))   # module fields must be hashable


def test_str_annotated_dtype_and_non_dtype_fields_stay_strings():
  class Named(nn.Module):
    dtype: str = "float32"
  assert models.config_fields(_cfg(dtype="bfloat16"), Named) == {
      "dtype": "bfloat16"}
  assert models.config_fields(_cfg(mode="float32"), _Toy) == {"mode": "float32"}


def test_unset_keys_left_to_class_and_overrides_win():
  out = models.config_fields(_cfg(mode="b"), _Toy, mode="c", widths=(9,))
  assert out == {"mode": "c", "widths": (9,)}
  assert _Toy(**models.config_fields(_cfg(), _Toy)).widths == (1, 2)


def test_misspelt_key_is_an_error_naming_it_and_the_fields():
  with pytest.raises(ConfigError) as e:
    models.config_fields(_cfg(widht=(1,)), _Toy)
  msg = str(e.value)
  assert "'widht'" in msg and "widths" in msg and "param_dtype" in msg
  assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_derived_and_ignored_keys_are_allowed_and_left_out():
  out = models.config_fields(_cfg(ratio=2.0, image_size=32, mode="b"), _Toy,
                             derived=("ratio",), ignore=("image_size",))
  assert out == {"mode": "b"}


def test_bad_dtype_name():
  with pytest.raises(ConfigError, match="'floaty'.*dtype"):
    models.config_fields(_cfg(dtype="floaty"), _Toy)
  # A dtype, but not one a model computes in.
  with pytest.raises(ConfigError, match=r"config.model.dtype='int8' is not a "
                     r"supported dtype here; use one of 'float32', 'bfloat16'"):
    models.config_fields(_cfg(dtype="int8"), _Toy)


def test_builder_rejects_misspelt_model_key():
  """A real builder: a typo in config.model fails instead of silently
  building the default-sized model."""
  cfg = ml_collections.ConfigDict(dict(name="rar", hidden_sise=64))
  with pytest.raises(ConfigError, match="hidden_sise"):
    models.build(cfg)
  # mlp_ratio is derived (-> mlp_dim), seq_len a field: both accepted.
  m = models.build(ml_collections.ConfigDict(dict(
      name="rar", hidden_size=64, num_heads=4, mlp_ratio=2.0, seq_len=16)))
  assert (m.mlp_dim, m.seq_len, m.depth) == (128, 16, rar.RAR.depth)
  with pytest.raises(ConfigError, match=r"config.model.hidden_size=65 is not "
                     r"divisible by config.model.num_heads=16"):
    models.build(ml_collections.ConfigDict(dict(name="rar", hidden_size=65)))
  # Each generator names its settings as flags (the CLI's one line).
  for cfg, msg in ((dict(name="far", dim=65, n_head=4),
                    r"config.model.dim=65 is not divisible by "
                    r"config.model.n_head=4"),
                   (dict(name="eq_generator", hidden_size=65, num_heads=4),
                    r"config.model.hidden_size=65 is not divisible by "
                    r"config.model.num_heads=4")):
    with pytest.raises(ConfigError, match=msg):
      models.build(ml_collections.ConfigDict(cfg))


def test_shared_base_keys_at_their_base_value_pass_a_class_without_them():
  """configs/base.py gives every model section remat = "none"; _Toy has no
  remat field: accepted at "none", an error when a remat is asked for."""
  assert models.config_fields(_cfg(remat="none"), _Toy) == {}
  with pytest.raises(ConfigError, match=r"\['remat'\]"):
    models.config_fields(_cfg(remat="full"), _Toy)


@pytest.mark.parametrize("cfg,key", [
    (dict(name="rar", remat="ful"), "config.model.remat='ful'"),
    (dict(name="maskgit_vqgan", remat="dots_batch"),
     "config.model.remat='dots_batch'"),
    (dict(name="eq_generator", remat="Full"), "config.model.remat='Full'"),
    (dict(name="eq_generator", attn_impl="flash"),
     "config.model.attn_impl='flash'")])
def test_bad_remat_or_attn_impl_fails_when_built(cfg, key):
  """models.build (no tracing) names the key and its values, instead of
  a bare ValueError from inside the first traced block."""
  with pytest.raises(ConfigError) as e:
    models.build(ml_collections.ConfigDict(cfg))
  msg = str(e.value)
  assert key in msg and isinstance(e.value, ValueError)
  values = (("auto", "reference", "pallas_tpu", "pallas_gpu")
            if "attn_impl" in key else ("none", "full", "dots"))
  assert all(repr(v) in msg for v in values), msg


def test_valid_remat_and_attn_impl_build():
  for remat in ("none", "full", "dots", "dots_no_batch", "", None):   # "", None: none
    assert models.build(ml_collections.ConfigDict(dict(
        name="rar", remat=remat))).remat == remat
  m = models.build(ml_collections.ConfigDict(dict(
      name="eq_generator", attn_impl="pallas_gpu", remat="dots")))
  assert (m.attn_impl, m.remat) == ("pallas_gpu", "dots")
