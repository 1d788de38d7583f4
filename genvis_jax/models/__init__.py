"""Model registry: ``build(config.model)`` and ``init_params(config.model, rng)``.

A model file registers itself with ``@register("name", example_inputs=fn)`` where
``fn(model_config, batch_size)`` returns the positional arguments that
``module.init`` needs. ``config.model.name`` selects the entry.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import flax.linen as nn
import jax

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.errors import ConfigError

_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {}
_EXAMPLES: dict[str, Callable[[Any, int], tuple]] = {}

# Modules imported lazily on first lookup so that importing the package is cheap.
_MODEL_MODULES = {
    "maskgit_vqgan": "genvis_jax.models.maskgit_vqgan",
    "patchgan": "genvis_jax.models.discriminator",
    "rar": "genvis_jax.models.rar",
    "classifier": "genvis_jax.models.classifier",
    "far": "genvis_jax.models.far",
    "llamagen_vq": "genvis_jax.models.llamagen_vq",
    "fqgan": "genvis_jax.models.fqgan",
    "eq_tokenizer": "genvis_jax.models.eq_tokenizer",
    "eq_generator": "genvis_jax.models.eq_generator",
    "dino_disc": "genvis_jax.models.dino_disc",
}


def register(name: str, example_inputs: Callable[[Any, int], tuple]):
  """Class/function decorator adding a model builder to the registry."""
  def deco(builder):
    _BUILDERS[name] = builder
    _EXAMPLES[name] = example_inputs
    return builder
  return deco


def _lookup(name: str):
  if name not in _BUILDERS and name in _MODEL_MODULES:
    importlib.import_module(_MODEL_MODULES[name])
  if name not in _BUILDERS:
    raise ValueError(f"Unknown model {name!r}; registered: "
                     f"{sorted(set(_BUILDERS) | set(_MODEL_MODULES))}.")
  return _BUILDERS[name], _EXAMPLES[name]


def build(model_config) -> nn.Module:
  """Returns the Flax module described by ``model_config`` (has ``.name``)."""
  builder, _ = _lookup(model_config.name)
  return builder(model_config)


def example_inputs(model_config, batch_size: int = 1) -> tuple:
  return _lookup(model_config.name)[1](model_config, batch_size)


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


def value_range(model_config) -> tuple[float, float]:
  """Pixel range (lo, hi) of a tokenizer's ``encode`` inputs and ``decode``
  outputs: the ``value_range`` class attribute of its module (MaskGIT VQGAN
  (0, 1); LlamaGen, FQGAN, Equivariant (-1, 1), as the official models).

  Raises ``ConfigError`` for a model that is not an image tokenizer.
  """
  rng = getattr(build(model_config), "value_range", None)
  if rng is None:
    raise ConfigError(f"Model {model_config.name!r} is not an image tokenizer "
                      f"(its module has no value_range); set the tokenizer's "
                      f"model config here, e.g. config.tokenizer.model.")
  return tuple(float(v) for v in rng)


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
