"""Models: ``build(config.model)``, ``init_params(config.model, rng)`` and
``load_params(config.model, directory)``.

``config.model.name`` names a module of this package (``"rar"`` ->
``genvis_jax/models/rar.py``) which defines ``build(model_config)`` and
``example_inputs(model_config, batch_size)``; see ``genvis_jax.core.registry``.
Building blocks shared by the models live in ``genvis_jax/models/layers/``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import registry
from genvis_jax.errors import ConfigError


def module(name: str):
  """The model module ``genvis_jax.models.<name>`` (``config.model.name``).

  It defines ``build(model_config) -> nn.Module`` and
  ``example_inputs(model_config, batch_size) -> tuple`` (the positional
  arguments ``module.init`` needs). Raises ``ConfigError`` for an unknown name.
  """
  return registry.module(__name__, name, ("build", "example_inputs"),
                         setting="config.model.name")


def build(model_config) -> nn.Module:
  """Returns the Flax module described by ``model_config`` (has ``.name``)."""
  return module(model_config.name).build(model_config)


def example_inputs(model_config, batch_size: int = 1) -> tuple:
  return module(model_config.name).example_inputs(model_config, batch_size)


def config_fields(model_config, cls, **overrides) -> dict:
  """The entries of ``model_config`` that are fields of the Flax module class
  ``cls``, then ``overrides``: a builder passes these (``cls(**...)``) so the
  defaults live in one place, the class. ``name`` (the registry key) and keys
  the class does not have are left out."""
  names = {f.name for f in dataclasses.fields(cls)} - {"name", "parent"}
  out = {k: v for k, v in model_config.items() if k in names}
  out.update(overrides)
  return out


def init_params(model_config, rng, *, boxed: bool = False):
  """Initialises the parameter pytree of ``build(model_config)``.

  With ``boxed=True`` leaves stay ``nn.LogicallyPartitioned`` (for sharding);
  otherwise plain arrays. Cheap under ``jax.eval_shape``.
  """
  model = build(model_config)
  variables = model.init({"params": rng, "dropout": rng},
                         *example_inputs(model_config, 1))
  params = variables["params"]
  return params if boxed else nn.unbox(params)


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
          f"{model_config.name!r} works on pixels in {want}: set "
          f"--config.{k}.value_range='{want}' (or drop the key).")
  return want


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def load_params(model_config, directory: str, mesh=None, *,
                setting: str = "the checkpoint path"):
  """Parameters of ``build(model_config)`` from a checkpoint directory.

  The one way weights reach a model at inference: ``directory`` is what
  ``python -m genvis_jax.convert`` writes or a training workdir (its EMA
  weights when tracked, see ``core.checkpoint.load_params``); replicated over
  ``mesh`` when given. ``setting`` names the config key the path came from
  (for the messages). Raises ``CheckpointNotFoundError`` (no path, nothing
  there), ``CheckpointMismatchError`` (another model or other shapes) and
  ``CheckpointRestoreError`` (no readable step).
  """
  if not directory:
    raise ckpt_lib.CheckpointNotFoundError(
        f"No checkpoint given for the {model_config.name!r} model: set "
        f"{setting}=DIR (a converted checkpoint from `python -m "
        "genvis_jax.convert` or a training workdir).")
  abstract = jax.eval_shape(
      lambda r: init_params(model_config, r), jax.random.key(0))
  if mesh is not None:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        abstract)
  return ckpt_lib.load_params(directory, abstract, setting=setting,
                              model_name=model_config.name)
