"""pytorch-fid's FID Inception state dict -> ``FIDInceptionV3`` Flax params.

Source: ``pt_inception-2015-12-05-6726825d.pth`` (torchvision Inception3 names).
Rename + transpose only:
  Mixed_6d.branch1x1.conv.weight (O, I, kh, kw) -> Mixed_6d/branch1x1/conv/kernel (kh, kw, I, O)
  Mixed_6d.branch1x1.bn.weight / bias           -> .../bn/scale / bias
  Mixed_6d.branch1x1.bn.running_mean / _var     -> .../bn/mean / var
  fc.weight (1008, 2048) / fc.bias              -> fc/kernel (2048, 1008) / fc/bias
``*.num_batches_tracked`` (BatchNorm step counters) carry no weights and are
skipped. ``load_inception_params`` reads any of the files the evaluator accepts.
"""

from __future__ import annotations

import numpy as np

from genvis_jax import convert as convert_lib
from genvis_jax import errors
from genvis_jax.convert import tree
from genvis_jax.models import inception

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean",
       "running_var": "var"}

NEEDS_CONFIG = False  # one fixed architecture
ADVICE = ("--src must be pytorch-fid's FID Inception, "
          "pt_inception-2015-12-05-6726825d.pth; no --config.")


def setting_howto(setting: str = "--config.evaluate.inception") -> str:
  """The fix for an unset ``setting`` (modes that need the FID Inception):
  where the weights come from and how to convert them."""
  return (f"set {setting}=ckpt/inception after `python -m genvis_jax.convert "
          "--kind=inception --src=pt_inception-2015-12-05-6726825d.pth "
          "--dst=ckpt/inception` (pytorch-fid's weights; the .pth itself "
          "works too)")


def _leaf(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if key.startswith("AuxLogits"):   # the whole file is another model's
    raise errors.CheckpointFileError(
        f"{key!r}: the FID Inception has no auxiliary head; pass pytorch-fid's "
        "pt_inception state dict (aux_logits=False), not torchvision's "
        "Inception3.")
  if key in ("fc.weight", "fc.bias"):
    return tree.convnet_leaf(key, value, ())
  module, _, kind = key.rpartition(".")
  *mods, layer = module.split(".")
  if layer == "conv" and kind == "weight" and value.ndim == 4:
    return "/".join([*mods, "conv", "kernel"]), tree.conv(value)
  if layer == "bn" and kind in _BN:
    return "/".join([*mods, "bn", _BN[kind]]), value
  return key, value   # kept: reported as unexpected


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """Maps pytorch-fid key names (numpy arrays) to the FIDInceptionV3 params tree.

  ``model_config`` is unused (one architecture); accepted so the function fits
  ``genvis_jax.convert.from_torch``. Values come back as float32 numpy arrays.
  """
  del model_config
  return tree.nest(_leaf(key, np.asarray(value, np.float32))
                   for key, value in state_dict.items()
                   if not key.endswith("num_batches_tracked"))


def expected(model_config=None):
  """Abstract params the converted tree must match (one architecture)."""
  del model_config
  return inception.abstract_inception_params()


def load_inception_params(path: str) -> dict:
  """Inception params from a local file; nothing is downloaded.

  ``path`` is one of:
    * a directory written by ``python -m genvis_jax.convert --kind=inception``
      (Orbax ``params`` checkpoint);
    * an ``.npz`` of our Flax layout (keys ``Mixed_5b/branch1x1/conv/kernel``,
      from ``flatten_params``);
    * pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` itself (read
      without torch) or its state dict saved as ``.npz`` (keys
      ``Mixed_5b.branch1x1.conv.weight``), converted on the fly.
  The tree is checked against the model's; a mismatch names the keys.
  """
  return convert_lib.load_weights(path, expected(), convert=convert,
                                 setting="--config.evaluate.inception",
                                 what="Inception weights", model_name="inception",
                                 fetch=(
      "Put pytorch-fid's pt_inception-2015-12-05-6726825d.pth there (read "
      "without torch), or convert it with `python -m genvis_jax.convert "
      "--kind=inception`"))
