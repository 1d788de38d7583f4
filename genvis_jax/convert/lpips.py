"""LPIPS (VGG16 "lin") weights: the two official files -> an ``.npz``, and
``load_lpips_params`` that reads it (or any file with the official names).

  python -m genvis_jax.convert --kind=lpips \
      --src=vgg16-397923af.pth,vgg.pth --dst=vgg_lpips.npz

``vgg16-397923af.pth``: torchvision's ImageNet VGG16 (keys ``features.{i}.*``);
``vgg.pth``: the LPIPS package's ``weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight``).
Both are legacy torch pickles; ``io`` reads them without torch. The ``.npz``
keeps the official names and PyTorch layouts (only the needed keys, float32).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from genvis_jax import convert as convert_lib
from genvis_jax import errors
from genvis_jax.convert import tree
from genvis_jax.core import files
from genvis_jax.models import lpips

NEEDS_CONFIG = False  # one fixed architecture
ADVICE = ("LPIPS takes both official files, comma-separated: --src="
          "vgg16-397923af.pth,vgg.pth (torchvision's VGG16 weights and the "
          "LPIPS v0.1 lin weights); no --config.")


_SLICE_KEY = re.compile(r"^net\.slice(\d)\.(\d+)\.(weight|bias)$")
_TV_KEY = re.compile(r"^features\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d)\.model\.1\.weight$")
_VGG_IDX = {i for idxs in lpips.VGG_SLICES for i in idxs}


def _leaf(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """Flax path and leaf of an official LPIPS / torchvision VGG16 key; None
  for keys LPIPS does not use (torchvision's classifier, the scaling layer)."""
  m = _SLICE_KEY.match(key) or _TV_KEY.match(key)
  if m:
    idx, kind = m.groups()[-2:]
    if int(idx) not in _VGG_IDX:   # kept: reported as unexpected
      return key, value
    return ((f"features_{int(idx)}/kernel", tree.conv(value)) if kind == "weight"
            else (f"features_{int(idx)}/bias", value))
  m = _LIN_KEY.match(key)
  return (f"lin_{int(m.group(1))}/kernel", tree.conv(value)) if m else None


def convert_lpips_state(state: dict[str, np.ndarray]) -> dict:
  """Official LPIPS / torchvision names (numpy, OIHW) -> LPIPS Flax params
  (kernels HWIO, float32 views); other keys are ignored. Missing weights are
  reported when the result is checked (``load_lpips_params``,
  ``from_torch``)."""
  items = (_leaf(k, np.asarray(v, np.float32)) for k, v in state.items())
  return tree.nest(item for item in items if item is not None)


def load_lpips_params(path: str) -> dict:
  """Loads LPIPS weights from a local ``.npz`` into Flax layout.

  Expected keys (numpy arrays in PyTorch layout):
    VGG16 convs, either LPIPS names ``net.slice{s}.{idx}.weight`` / ``.bias``
    (s = 1..5, idx in 0,2 | 5,7 | 10,12,14 | 17,19,21 | 24,26,28; weight
    (C_out, C_in, 3, 3)) or torchvision names ``features.{idx}.weight`` /
    ``.bias`` with the same idx;
    linear heads ``lin{k}.model.1.weight`` (1, C_k, 1, 1), k = 0..4,
    C = 64, 128, 256, 512, 512.
  Other keys (e.g. ``scaling_layer.shift``, torchvision classifier) are ignored.
  Returns the ``params`` pytree of ``LPIPS`` (kernels HWIO).
  """
  return convert_lib.load_weights(
      path, expected(), convert=convert,
      setting="loss.lpips_path / evaluate.lpips_path",
      what="LPIPS weights", fetch="Convert the LPIPS VGG weights with "
      "`python -m genvis_jax.convert --kind=lpips`")


def _needed(key: str) -> bool:
  return bool(_SLICE_KEY.match(key) or _TV_KEY.match(key)
              or _LIN_KEY.match(key))


def convert(state_dict, model_config=None) -> dict:
  del model_config
  return convert_lpips_state(state_dict)


def expected(model_config=None):
  """The converted tree's shapes (LPIPS has one architecture), abstract."""
  del model_config
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return convert_lib.module_shapes(lpips.LPIPS(), x, x)


def write(dst: str, params, state_dict) -> None:
  del params
  if not dst.endswith(".npz"):
    raise errors.ConfigError(
        f"--dst for kind lpips is an .npz file, got {dst!r}.")
  arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
            if _needed(k)}
  files.write_whole(dst, lambda tmp: np.savez(tmp, **arrays))   # or gs://
