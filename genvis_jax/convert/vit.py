"""Official ViT names -> the shared ViT's Flax names (``models/layers/vit.py``).

One :class:`Names` table per family (HF CLIP in ``convert/clip_vision.py``, HF DINOv2
in ``convert/dinov2.py``, timm / DINO in ``convert/dino_vit.py``) says where
each official module goes; :func:`convert` applies it to a state dict:
  a module of ``top`` or, inside block i (``blocks`` matches the official
  prefix and captures i), of ``block`` -> its Flax path; its ``weight`` /
  ``bias`` become ``kernel`` (Linear transposed, Conv2d OIHW -> HWIO),
  ``scale`` (1-D weight) or ``bias``;
  a whole tensor of ``tensors`` / ``block_tensors`` (class token, position
  table, LayerScale) -> its Flax path, leading 1-sized axes dropped down to
  the stated rank.
A key no rule covers keeps its official name, so ``from_torch`` reports it as
unexpected (or the caller drops it).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from genvis_jax.convert import tree
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError


@dataclasses.dataclass(frozen=True)
class Names:
  """Official -> Flax names of one ViT family (see the module docstring).

  tensors / block_tensors map an official key (block: the part after the
  block prefix) to ``(flax path, rank)``.
  """
  top: dict[str, str]
  blocks: str
  block: dict[str, str]
  tensors: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
  block_tensors: dict[str, tuple[str, int]] = dataclasses.field(
      default_factory=dict)


# The shared block, as named in ``models/layers/vit.py``.
BLOCK = "encoder/block_{}/"


def squeeze_to(value: np.ndarray, rank: int, key: str) -> np.ndarray:
  """Drops leading 1-sized axes of ``value`` down to ``rank`` axes."""
  lead = value.shape[:value.ndim - rank]
  if value.ndim < rank or any(n != 1 for n in lead):
    raise CheckpointMismatchError(f"{key}: expected {rank} axes after leading 1-sized "
                     f"ones, got shape {value.shape}.")
  return value.reshape(value.shape[value.ndim - rank:])


def leaf(key: str, value: np.ndarray, names: Names):
  """Flax path and leaf of one official key (official key if unknown)."""
  m = re.match(names.blocks + r"\.", key)
  prefix, rest = ("", key) if m is None else (BLOCK.format(m.group(1)),
                                              key[m.end():])
  tensors = names.tensors if m is None else names.block_tensors
  modules = names.top if m is None else names.block
  if rest in tensors:
    path, rank = tensors[rest]
    return prefix + path, squeeze_to(value, rank, key)
  module, _, kind = rest.rpartition(".")
  if module not in modules:
    return key, value
  return tree.param_leaf(prefix + modules[module], kind, value) or (key, value)


def convert_names(state_dict: dict[str, np.ndarray], names: Names) -> dict:
  """Official ``{key: array}`` -> nested Flax params by ``names``."""
  return tree.nest([leaf(k, v, names) for k, v in state_dict.items()])
