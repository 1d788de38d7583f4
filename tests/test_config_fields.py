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
  with pytest.raises(ConfigError, match=r"config.model.num_heads=16 does not "
                     r"divide the attention width 65 \(config.model.hidden_size\)"
                     r".*use one of \[1, 5, 13\]"):
    models.build(ml_collections.ConfigDict(dict(name="rar", hidden_size=65)))
  # Each generator names its settings as flags (the CLI's one line).
  for cfg, msg in ((dict(name="far", dim=65, n_head=4),
                    r"config.model.n_head=4 does not divide the attention "
                    r"width 65 \(config.model.dim\)"),
                   (dict(name="eq_generator", hidden_size=65, num_heads=4),
                    r"config.model.num_heads=4 does not divide the attention "
                    r"width 65 \(config.model.hidden_size\)")):
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


@pytest.mark.parametrize("spec,key,value,message", [
    ("rar_b.py:runlocal", "model.num_heads", 0, r"num_heads=0 of RAR .*at least 1"),
    ("rar_b.py:runlocal", "model.depth", -1, r"depth=-1 of RAR .*at least 1"),
    ("rar_b.py:runlocal", "model.num_classes", 0, r"num_classes=0 .*at least 1"),
    ("rar_b.py:runlocal", "model.mlp_dim", -1,
     r"mlp_dim=-1 .*at least 0 \(0: derived from the other settings\)"),
    ("rar_b.py:runlocal", "model.dropout", 10.0,
     r"dropout=10.0 of RAR .*dropout rate: 0 <= rate <= 1"),
    ("far_b.py:dual,runlocal", "model.class_dropout", -0.5, r"dropout rate"),
    ("far_b.py:dual,runlocal", "model.rope_base", 0.0,
     r"rope_base=0.0 of FAR .*finite number > 0"),
    ("fqgan_dual_ds16.py:runlocal", "model.entropy_temperature", 0.0,
     r"entropy_temperature=0.0 .*> 0"),
    ("fqgan_dual_ds16.py:runlocal", "model.entropy_group_size", -1,
     r"entropy_group_size=-1 .*at least 0"),
    ("fqgan_dual_ds16.py:runlocal", "model.feat_heads", "(0,)",
     r"feat_heads entries are \(branch, width >= 1\) pairs"),
    ("fqgan_dual_ds16.py:runlocal", "model.feat_heads",
     "(('sem', 8), ('sem', 8))", r"names a branch twice"),
    ("eq_tokenizer.py:runlocal", "model.semantic_map", "bogus",
     r"semantic_map='bogus' is not a decoder tap"),
    ("eq_tokenizer.py:runlocal", "disc.head_kernel", 4,
     r"disc.head_kernel=4 must be odd"),
    ("eq_tokenizer.py:runlocal", "disc.virtual_bs", 0,
     r"virtual_bs=0 of DinoDiscriminator .*at least 1"),
    ("fqgan_dual_ds16.py:runlocal", "model.adapter_heads", 3,
     r"model.adapter_heads=3 does not divide the attention width 32 "
     r"\(hidden_channels \* channel_mult\[-1\]\).*\[1, 2, 4, 8, 16, 32\]"),
    ("fqgan_dual_ds16.py:runlocal", "model.feat_num_heads", 3,
     r"feat_num_heads=3 .*width of feat_heads entry 'sem'"),
    ("eq_tokenizer.py:runlocal", "disc.num_heads", 5,
     r"config.disc.num_heads=5 does not divide .*\(config.disc.dim\)"),
    ("eq_tokenizer.py:runlocal", "model.attn_resolutions", "(3,)",
     r"attn_resolutions=\(3,\) lists \[3\], which is no level's "
     r"feature-map height.*the levels are \[32, 16, 8, 4, 2\]"),
    ("eq_tokenizer.py:runlocal", "model.ch_mult", "()",
     r"config.model.ch_mult is empty"),
    ("maskgit_vqgan.py:runlocal", "model.channel_mult", "()",
     r"config.model.channel_mult is empty"),
    ("maskgit_vqgan.py:runlocal", "disc.n_layers", 4,
     r"n_layers=4 leaves the PatchGAN no output pixel on 32-px images.*at "
     r"most 3"),
])
def test_values_a_setting_cannot_take_are_refused_naming_it(spec, key, value,
                                                             message):
  """Set on the command line, a size of 0, a negative count, a dropout rate
  given in percent, a zero RoPE base or temperature, a malformed feature
  head list: each gave a deep traceback at init or trace time (a modulo by
  zero, a reshape of negative size) or trained silently wrong (all
  activations dropped, NaN in the first step). A head count not dividing its
  attention width said "ViT width 32 is not divisible by 3 heads" at init,
  without the setting; an empty channel multiplier list raised an
  ``IndexError``; an ``attn_resolutions`` entry no level has left the model
  without attention silently."""
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  config = pc.load_config(spec, **{key: value})
  section = config.disc if key.startswith("disc.") else config.model
  with pytest.raises(ConfigError, match=message):
    models.build(section)


@pytest.mark.parametrize("spec,key,value", [
    ("rar_b.py:runlocal", "model.dropout", 0.0),
    ("rar_b.py:runlocal", "model.mlp_dim", 0),           # derived: ratio
    ("eq_tokenizer.py:runlocal", "disc.replica_batch", 0),  # whole batch
    ("fqgan_dual_ds16.py:runlocal", "model.feat_layers", 0),   # ZERO_OK
    ("fqgan_dual_ds16.py:runlocal", "model.adapter_layers", 0),
    ("maskgit_vqgan.py:runlocal", "disc.n_layers", 3),
])
def test_edge_values_with_a_meaning_build(spec, key, value):
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  config = pc.load_config(spec, **{key: value})
  section = config.disc if key.startswith("disc.") else config.model
  field = key.split(".")[1]
  built = getattr(models.build(section), field)
  if field in getattr(models.module(section.name), "CONFIG_UNSET", {}):
    assert built > 0, built           # derived from the other settings
  else:
    assert built == value


@pytest.mark.parametrize("spec,key,value,message", [
    ("maskgit_vqgan.py:runlocal", "model.image_size", 64,
     r"config.model.image_size=64 but the images are 32 px "
     r"\(config.data.image_size\).*--config.data.image_size=64"),
    ("vq_ds16.py:runlocal", "model.image_size", 64, r"image_size=64"),
    ("eq_tokenizer.py:runlocal", "model.image_width", 128,
     r"config.model.image_width=128 but the images are 64 px"),
    # An unset data width is the height (32 px), not the model's 64.
    ("eq_tokenizer.py:runlocal", "data.image_width", 0,
     r"config.model.image_width=64 but the images are 32 px"),
])
def test_a_model_image_size_other_than_the_data_is_refused(spec, key, value,
                                                           message):
  """The tokenizers are convolutional: a model image size other than the
  data's sized only their initialisation, and they trained on the data's
  images without a word."""
  from genvis_jax.train import checks  # pylint: disable=import-outside-toplevel
  from genvis_jax.train.tasks import get_task  # pylint: disable=import-outside-toplevel
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  checks.check_image_size(pc.load_config(spec), get_task(pc.load_config(spec)))
  config = pc.load_config(spec, **{key: value})
  with pytest.raises(ConfigError, match=message):
    checks.check_image_size(config, get_task(config))


@pytest.mark.parametrize("spec", ["eq_tokenizer.py:runlocal", "eq_s.py:runlocal"])
def test_a_width_of_part_of_a_token_column_is_refused_at_start(spec):
  """Found at the first step, after a crop error that did not name the
  cause (the column tokenizer encodes 16-px columns); a generator on
  pre-computed latents reads no image."""
  from genvis_jax.train import checks  # pylint: disable=import-outside-toplevel
  from genvis_jax.train.tasks import get_task  # pylint: disable=import-outside-toplevel
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  overrides = {"data.image_width": 72}
  if spec.startswith("eq_tokenizer"):
    overrides["model.image_width"] = 72
  config = pc.load_config(spec, **overrides)
  with pytest.raises(ConfigError, match=r"config.data.image_width=72 is not a "
                     r"multiple of the token width 16 px.*to 64 or 80"):
    checks.check_token_width(config, get_task(config))
  # An unset width is the height: named as the key it came from.
  config = pc.load_config(spec, **{"data.image_size": 40, "data.image_width": 0})
  with pytest.raises(ConfigError, match=r"config.data.image_size=40 \(the width: "
                     r"config.data.image_width is 0, the height\)"):
    checks.check_token_width(config, get_task(config))
  # A width of whole columns: the generator's seq_len follows it (refused
  # apart: its weights do not depend on it).
  wide = {"data.image_width": 80}
  if not spec.startswith("eq_tokenizer"):
    config = pc.load_config(spec, **wide)
    with pytest.raises(ConfigError, match=r"config.model.seq_len=4, but the "
                       r"training images are 5 columns"):
      checks.check_token_width(config, get_task(config))
    wide["model.seq_len"] = 5
  config = pc.load_config(spec, **wide)
  checks.check_token_width(config, get_task(config))


@pytest.mark.parametrize("spec,key,value,message", [
    ("maskgit_vqgan.py:runlocal", "model.hidden_channels", 48,
     r"config.model.hidden_channels=48 x channel_mult\[0\]=1 = 48 channels, "
     r"which GroupNorm's 32 groups do not divide"),
    ("vq_ds16.py:runlocal", "model.hidden_channels", 40,
     r"hidden_channels=40 x channel_mult\[0\]=1 = 40 channels"),
    ("fqgan_dual_ds16.py:runlocal", "model.hidden_channels", 48, r"48 channels"),
    ("eq_tokenizer.py:runlocal", "model.ch", 24, r"config.model.ch=24 x ch_mult"),
])
def test_channel_widths_groupnorm_cannot_split_are_refused(spec, key, value,
                                                           message):
  """Flax said only "Number of groups (32) does not divide the number of
  channels (48)" when the weights were initialised."""
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=message):
    models.build(pc.load_config(spec, **{key: value}).model)


def test_finish_refuses_a_misspelt_key_of_a_derived_config():
  """A config file built on ``base.get_config()`` that misspells a key of a
  section (``train.ema_decy``) failed nothing: the run trained with the
  default. ``finish`` names the key and the one it resembles, in a demo's
  stages too, and leaves keys of one's own that resemble none alone."""
  from configs import base, demo
  c = base.get_config()
  c.train.ema_decy = 0.9999
  c.data.random_flp = False
  with pytest.raises(ConfigError, match=r"data\.random_flp \(did you mean "
                     r"random_flip\?\), train\.ema_decy \(did you mean "
                     r"ema_decay\?\)"):
    base.finish(c)
  c = demo.get_config()
  with c.stages.rar.unlocked():
    c.stages.rar.smaple = c.stages.rar.sample
  with pytest.raises(ConfigError, match=r"stages\.rar\.smaple \(did "
                     r"you mean sample\?\)"):
    base.finish(c)
  c = base.get_config()
  c.train.my_own_weight = 0.5
  assert base.finish(c).train.my_own_weight == 0.5


def test_every_shipped_config_key_is_declared():
  """``base.ADDED_KEYS`` (the keys ``finish`` tells misspellings from)
  holds every key the shipped configs set, paper and runlocal, each demo
  stage included: a key left out of it would go unchecked."""
  import importlib
  from configs import base
  from genvis_jax.core import settings
  from tests.test_configs import RUNNABLE
  undeclared = set()
  for name in RUNNABLE:
    module = importlib.import_module(f"configs.{name}")
    for arg in (None, "runlocal", "triple", "stage2", "tokenizer"):
      try:
        config = module.get_config(arg)
      except ValueError:   # an argument this config does not take
        continue
      undeclared.update(f"{name}:{arg} {path}" for path, _ in
                        settings.unknown_keys(config, base.known_keys(),
                                              base.MODEL_SECTIONS))
  assert not undeclared, sorted(undeclared)
