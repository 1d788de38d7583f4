"""Models: ``build(config.model)``, ``init_params(config.model, rng)`` and
``load_params(config.model, directory)``.

``config.model.name`` names a module of this package (``"rar"`` ->
``genvis_jax/models/rar.py``) which defines ``build(model_config)`` and
``example_inputs(model_config, batch_size)``; see ``genvis_jax.core.registry``.
Building blocks shared by the models live in ``genvis_jax/models/layers/``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys

import flax.linen as nn
import jax
import ml_collections

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import checkpoint_fit
from genvis_jax.core import dtypes
from genvis_jax.core import weights as weights_lib
from genvis_jax.core import registry
from genvis_jax.core import sharding as shd
from genvis_jax.errors import ConfigError
from genvis_jax.kernels import windowed_attention
from genvis_jax.models import layers


def module(name: str):
  """The model module ``genvis_jax.models.<name>`` (``config.model.name``).

  It defines ``build(model_config) -> nn.Module`` and
  ``example_inputs(model_config, batch_size) -> tuple`` (the positional
  arguments ``module.init`` needs). Raises ``ConfigError`` for an unknown name.
  """
  return registry.module(__name__, name, ("build", "example_inputs"),
                         setting="config.model.name")


def build(model_config) -> nn.Module:
  """Returns the Flax module described by ``model_config`` (has ``.name``).
  Raises ``ConfigError`` for an unknown name, or what the model's ``build``
  raises (e.g. an unknown key, ``config_fields``)."""
  return module(model_config.name).build(model_config)


def example_inputs(model_config, batch_size: int = 1) -> tuple:
  """The positional arguments (arrays of zeros, ``batch_size`` examples) that
  ``build(model_config).init`` takes; each model module documents its
  tuple's shapes."""
  return module(model_config.name).example_inputs(model_config, batch_size)


SHARED_DEFAULTS = {"dtype": "float32", "param_dtype": "float32", "remat": "none"}

# Settings a module would only check once traced (deep inside a block): each
# is checked when the model is built, by a ConfigError naming the key.
CHECKS = {"remat": layers.check_remat,
          "attn_impl": windowed_attention.check_impl}


def config_fields(model_config, cls, *, derived=(), ignore=(),
                  **overrides) -> dict:
  """``model_config``'s entries as keyword arguments of the Flax module class
  ``cls``, then ``overrides``: a builder passes these (``cls(**...)``) so a
  field's default lives in one place, the class, and a config file states
  only what differs (``configs/base.finish`` lists the other fields at
  ``config_defaults``).

  Values are made fit for a (hashable) module field: lists become tuples (at
  any depth), and a dtype name ("float32", "bfloat16") for a field named
  ``dtype`` / ``param_dtype`` becomes a ``jnp.dtype`` unless the class
  annotates that field ``str``.

  Args:
    model_config: a mapping (``config.model``); ``name`` is the registry key.
    cls: the module class.
    derived: config keys the builder turns into other fields itself (e.g.
      ``mlp_ratio`` -> ``mlp_dim``); left out here.
    ignore: config keys read elsewhere (e.g. ``image_size`` by
      ``example_inputs``, ``optimizer`` by the trainer); left out here.
    **overrides: field values the builder computed; they win.
  Returns:
    dict field name -> value.
  Raises:
    ConfigError: a key that is none of a field, ``derived`` or ``ignore``
      (a misspelt key would otherwise be silently dropped), naming the key and
      the valid ones; a dtype name that is not a dtype; a ``CHECKS`` setting
      (``remat``, ``attn_impl``) outside its values.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)
            if f.name not in ("name", "parent")}
  # Every model section carries the shared precision / remat keys of
  # configs/base.py; a class without such a setting accepts it at its
  # base value only (a bf16 or remat request it cannot honour is an error).
  skip = {"name", *derived, *ignore,
          *(k for k, v in SHARED_DEFAULTS.items()
            if k not in fields and model_config.get(k, v) == v)}
  unknown = sorted(k for k in model_config.keys()
                   if k not in fields and k not in skip)
  if unknown:
    raise ConfigError(
        f"Model config key(s) {unknown} are not settings of {cls.__name__} "
        f"(config.model.name={model_config.get('name', '')!r}); fix the "
        f"spelling or remove them. Valid keys: "
        f"{sorted(set(fields) | skip - {'name'})}.")
  module_ = sys.modules.get(cls.__module__)
  zero_ok = {*getattr(module_, "CONFIG_UNSET", {}),
             *getattr(module_, "ZERO_OK", ())}
  where = f"{cls.__name__} (model name {model_config.get('name', '')!r})"
  for k, v in model_config.items():
    if k in fields:
      _check_range(k, v, fields[k].default, k in zero_ok, where)
  out = {k: _field_value(k, v, fields[k]) for k, v in model_config.items()
         if k in fields}
  out.update(overrides)
  return out


def is_dropout(key: str) -> bool:
  """Whether model setting ``key`` (a field name, or a dotted path ending in
  one) is a dropout rate: a probability in [0, 1] that acts in training
  only (every model runs deterministic at inference)."""
  return key.endswith("dropout")


# Float settings that must be positive (a zero or negative one gives NaN or
# inf in the first step, which then reads as a diverged run).
POSITIVE = ("rope_base", "entropy_temperature", "norm_eps")


def _check_range(key: str, value, default, zero_ok: bool, where: str) -> None:
  """Refuses values a setting cannot take, by what it is: a dropout rate
  (``*dropout``) in [0, 1] (FAR's ``class_dropout`` 1 trains unconditional);
  a ``POSITIVE`` float above 0; a size or count
  (an int field whose class default is at least 1) at least 1, or at least
  0 where the module gives 0 a meaning (``CONFIG_UNSET``: derived;
  ``ZERO_OK``); an int field defaulting to 0, at least 0. Raises
  ``ConfigError`` naming the setting and the model."""
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if is_dropout(key):
    if not (number and 0 <= value <= 1):
      raise ConfigError(f"Model setting {key}={value!r} of {where} is a "
                        "dropout rate: 0 <= rate <= 1 (0.1 drops 10%).")
  elif key in POSITIVE:
    if not (number and value > 0 and math.isfinite(value)):
      raise ConfigError(f"Model setting {key}={value!r} of {where} must be "
                        "a finite number > 0.")
  elif (isinstance(default, int) and not isinstance(default, bool)
        and isinstance(value, int) and not isinstance(value, bool)):
    lowest = 0 if default < 1 or zero_ok else 1
    if value < lowest:
      raise ConfigError(
          f"Model setting {key}={value} of {where} must be at least "
          f"{lowest}" + (" (0: derived from the other settings)."
                         if zero_ok and default >= 1 else "."))


@functools.lru_cache(maxsize=None)
def _defaults(name: str) -> tuple:
  module_ = module(name)
  cls = type(module_.build(ml_collections.ConfigDict({"name": name})))
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in ("name", "parent") or f.name in SHARED_DEFAULTS:
      continue
    if f.default is not dataclasses.MISSING:
      out[f.name] = _tuples(f.default)
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = _tuples(f.default_factory())
  out.update(getattr(module_, "CONFIG_UNSET", {}))
  return tuple(out.items())


def config_defaults(name: str) -> dict:
  """Every setting of model ``name`` (``config.model.name``) a config may
  leave out, at the value leaving it out means: {field: value} of the module
  class's fields at their defaults, and each field its builder derives from
  others when unset (the model module's ``CONFIG_UNSET``, e.g. RAR's
  ``mlp_dim`` from ``mlp_ratio``) at its unset value. The shared keys
  (``SHARED_DEFAULTS``) are left to the config.

  ``configs/base.finish`` adds the missing ones to each model section, so
  every field can be set on the command line (``--config.model.dropout=0.1``)
  while its default stays in one place, the class. Values are plain Python
  (tuples for sequences). Raises ``ConfigError`` for an unknown name.
  """
  return dict(_defaults(name))


def with_defaults(recorded: dict) -> dict:
  """A model section as recorded in JSON (a checkpoint's or sample parts'
  config) with the settings it leaves out at ``config_defaults``: what it
  ran with, comparable key by key with a config ``configs/base.finish``
  completed (a record written before a config listed a setting matches a
  config that lists it at its default). Sections of no buildable model are
  returned as they are."""
  name = recorded.get("name") if isinstance(recorded, dict) else None
  try:
    defaults = config_defaults(name) if name else {}
  except ConfigError:
    return recorded
  return {**json.loads(json.dumps(defaults)), **recorded}


checkpoint_fit.register_model_defaults(with_defaults)


def _field_value(key, value, field):
  """A config value as module field ``key`` takes it (see config_fields)."""
  if key in CHECKS:
    CHECKS[key](value)
  if key in ("dtype", "param_dtype") and isinstance(value, str) \
      and field.type not in ("str", str):
    return dtypes.parse(value, f"config.model.{key}")
  return _tuples(value)


def _tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def init_params(model_config, rng, *, boxed: bool = False):
  """Initialises the parameter pytree of ``build(model_config)``.

  With ``boxed=True`` leaves stay ``nn.LogicallyPartitioned`` (for sharding);
  otherwise plain arrays (in each module's ``param_dtype``, float32 by
  default). Cheap under ``jax.eval_shape``. Raises what ``build`` raises.
  """
  model = build(model_config)
  # Dropout draws from its own stream (init runs deterministic layers, but
  # a module that drew at init would otherwise reuse the params key).
  variables = model.init({"params": rng,
                          "dropout": jax.random.fold_in(rng, 1)},
                         *example_inputs(model_config, 1))
  params = variables["params"]
  return params if boxed else nn.unbox(params)


def param_shapes(model_config):
  """Abstract (``ShapeDtypeStruct``) parameters of ``build(model_config)``:
  ``init_params`` under ``jax.eval_shape``, nothing allocated."""
  return jax.eval_shape(lambda r: init_params(model_config, r),
                        jax.random.key(0))


def is_image_tokenizer(model_config) -> bool:
  """Whether ``model_config`` builds an image tokenizer: a module with
  ``encode`` / ``decode`` and its pixel ``value_range`` class attribute."""
  return getattr(build(model_config), "value_range", None) is not None


def value_range(model_config, config=None,
                stated_in: tuple[str, ...] = ()) -> tuple[float, float]:
  """Pixel range (lo, hi) of a tokenizer's ``encode`` inputs and ``decode``
  outputs: the ``value_range`` class attribute of its module (MaskGIT VQGAN
  (0, 1); LlamaGen, FQGAN, Equivariant (-1, 1), as the official models).

  With ``config``, every section ``config.<k>`` for ``k`` in ``stated_in``
  that sets ``value_range`` must agree (a stale key would silently feed the
  model pixels in the wrong range). Raises ``ConfigError`` for a model that
  is not an image tokenizer, or naming both ranges on a mismatch.
  """
  rng = getattr(build(model_config), "value_range", None)
  if rng is None:
    raise ConfigError(f"Model {model_config.name!r} is not an image tokenizer "
                      f"(its module has no value_range); set the tokenizer's "
                      f"model config here, e.g. config.tokenizer.model.")
  want = tuple(float(v) for v in rng)
  for k in stated_in:
    section = config.get(k, None)
    stated = section.get("value_range", None) if section is not None else None
    if stated is not None and tuple(float(v) for v in stated) != want:
      raise ConfigError(
          f"config.{k}.value_range={tuple(stated)} but tokenizer "
          f"{model_config.name!r} works on pixels in {want}: remove "
          f"config.{k}.value_range (the tokenizer model fixes the range).")
  return want


def count_params(params) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def load_params(model_config, directory: str, mesh=None, *,
                setting: str = "the checkpoint path"):
  """Parameters of ``build(model_config)`` from a checkpoint directory.

  The one way weights reach a model at inference: ``directory`` is what
  ``python -m genvis_jax.convert`` writes, a training workdir (its newest
  step's EMA weights when tracked) or one ``checkpoints/<step>`` of it, see
  ``core.weights.restore_params``; replicated over ``mesh`` when given,
  else host NumPy arrays (never the devices they were saved from). A run is
  pinned to the step process 0 finds newest
  (``core.weights.restore_pinned``), so every process must call this and all
  load the same step. ``setting`` names the config key the path came from
  (for the messages). Raises ``CheckpointNotFoundError`` (no path, nothing
  there), ``CheckpointMismatchError`` (another model or other shapes) and
  ``CheckpointRestoreError`` (no readable step).
  """
  if not directory:
    raise ckpt_lib.CheckpointNotFoundError(
        f"No checkpoint given for the {model_config.name!r} model: set "
        f"{setting}=DIR (a converted checkpoint from `python -m "
        "genvis_jax.convert`, a training workdir or one of its "
        "checkpoints/<step> folders).")
  abstract = param_shapes(model_config)
  if mesh is not None:
    sharding = shd.replicated(shd.auto_axes(mesh))
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        abstract)
  return weights_lib.restore_pinned(directory, abstract, setting=setting,
                                    model_config=model_config)
