"""Helpers shared by the converters: nesting flat paths and torch layouts.

Transposes return views (no copy), so converting a multi-GB checkpoint does not
double its memory. A converter maps each official key to a Flax path (``"blocks_0/attn/qkv/kernel"``)
and a leaf. Keys it does not recognise are kept under their official name, so the
single mismatch report of ``from_torch`` lists them as unexpected.
"""

from __future__ import annotations

import numpy as np

from genvis_jax.core.checkpoint_fit import CheckpointMismatchError


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out) (a view)."""
  return np.swapaxes(w, 0, 1) if w.ndim == 2 else w


def conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O) (a view)."""
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w


def nest(items) -> dict:
  """``[("a/b/c", x), ...]`` (or a dict) -> ``{"a": {"b": {"c": x}}}``; clear
  error when two official keys land on one path."""
  tree: dict = {}
  for path, leaf in (items.items() if isinstance(items, dict) else items):
    *mods, name = path.split("/")
    node = tree
    for m in mods:
      node = node.setdefault(m, {})
      if not isinstance(node, dict):
        raise CheckpointMismatchError(
            f"Two checkpoint keys collide at {path!r}.")
    if name in node:
      raise CheckpointMismatchError(f"Two checkpoint keys map to {path!r}.")
    node[name] = leaf
  return tree


def module_path(key: str, lists: tuple[str, ...]) -> list[str]:
  """``"encoder.mid.1.norm"`` -> ``["encoder", "mid_1", "norm"]``: a ModuleList
  name in ``lists`` followed by an index becomes one Flax module name."""
  parts, out, i = key.split("."), [], 0
  while i < len(parts):
    if parts[i] in lists and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  return out


# Official module names (taming / LDM ResnetBlock) that the shared conv blocks
# of ``genvis_jax/models/layers/resnet.py`` call by what they are.
RESNET_RENAMES = {"nin_shortcut": "shortcut"}


def rename_modules(path: list[str], renames: dict[str, str]) -> list[str]:
  """Replaces each module name of ``path`` found in ``renames`` (official ->
  Flax name; a Flax name may span levels, ``"upsample/conv"``)."""
  return [n for m in path for n in renames.get(m, m).split("/")]


def convnet_leaf(key: str, value: np.ndarray, lists: tuple[str, ...],
                 renames: dict[str, str] | None = None):
  """Flax path and leaf of a conv-net parameter: 4-D weight -> conv ``kernel``
  (HWIO), 1-D weight -> norm ``scale``, 2-D weight -> Dense ``kernel``,
  bias -> ``bias``; module names renamed by ``renames`` (see
  ``rename_modules``). Anything else keeps its official name (reported as
  unexpected)."""
  module, _, kind = key.rpartition(".")
  path = "/".join(rename_modules(module_path(module, lists), renames or {}))
  return param_leaf(path, kind, value) or (key, value)


def param_leaf(path: str, kind: str, value: np.ndarray):
  """(Flax path, leaf) of torch parameter ``kind`` of the module at Flax
  ``path`` ("a/b"), by its rank: ``bias`` -> ``bias``; a 4-D weight -> conv
  ``kernel`` (HWIO), 2-D -> Dense ``kernel`` (in, out), 1-D -> norm
  ``scale``. None for anything else (the caller keeps the official name)."""
  if kind == "bias":
    return f"{path}/bias", value
  if kind == "weight" and value.ndim == 4:
    return f"{path}/kernel", conv(value)
  if kind == "weight" and value.ndim == 2:
    return f"{path}/kernel", linear(value)
  if kind == "weight" and value.ndim == 1:
    return f"{path}/scale", value
  return None
