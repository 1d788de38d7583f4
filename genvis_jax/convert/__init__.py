"""Official PyTorch checkpoints -> Flax parameters (rename + transpose, checked).

  params = from_torch("rar", state_dict, config.model)
  python -m genvis_jax.convert --kind=rar --src=rar_b.bin \
      --config=configs/rar_b.py --dst=/ckpt/rar_b

``state_dict`` maps official key names to numpy arrays (``io.load_state_dict``
reads .bin/.pt/.pth/.ckpt without torch, .safetensors and .npz). Every result is
checked against ``jax.eval_shape(models.init_params(model_config))``: a checkpoint
that does not fit the config raises one ``CheckpointMismatchError`` listing the
missing, unexpected and mis-shaped keys, and nothing is written.

Adding a kind = one converter ``fn(state_dict, model_config) -> params`` plus one
line in ``KINDS``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np

from genvis_jax import errors, models
from genvis_jax.convert import io
from genvis_jax.core import registry
from genvis_jax.core.checkpoint import (CheckpointMismatchError, compare_trees,
                                        save_params)

__all__ = ["KINDS", "Kind", "from_torch", "convert_file", "CheckpointMismatchError"]


@dataclasses.dataclass(frozen=True)
class Kind:
  """How to convert, check and write one kind of official checkpoint.

  Each field is ``"module:function"`` (imported on use):
    convert(state_dict, model_config) -> params (numpy leaves);
    expected(model_config) -> abstract params the result must match;
    write(dst, params, state_dict) -> None.
  """
  convert: str
  expected: str = "genvis_jax.convert:model_shapes"
  write: str = "genvis_jax.convert:write_orbax"
  needs_config: bool = True


KINDS: dict[str, Kind] = {
    "rar": Kind("genvis_jax.convert.rar:convert_rar"),
    "maskgit_vqgan": Kind("genvis_jax.convert.maskgit_vqgan:convert_maskgit_vqgan"),
    "llamagen_vq": Kind("genvis_jax.convert.llamagen_vq:convert_llamagen_vq"),
    "fqgan": Kind("genvis_jax.convert.fqgan:convert_fqgan"),
    "eq_tokenizer": Kind("genvis_jax.convert.eq:convert_eq_tokenizer"),
    "eq_generator": Kind("genvis_jax.convert.eq:convert_eq_generator"),
    "far": Kind("genvis_jax.convert.far:convert_far"),
    "lpips": Kind("genvis_jax.convert.lpips:convert_lpips",
                  expected="genvis_jax.convert.lpips:lpips_shapes",
                  write="genvis_jax.convert.lpips:write_npz", needs_config=False),
    "inception": Kind("genvis_jax.convert.inception:convert_fid_inception",
                      expected="genvis_jax.convert.inception:inception_shapes",
                      needs_config=False),
    "clip_vision": Kind("genvis_jax.convert.clip:convert_clip_vision",
                        expected="genvis_jax.convert.clip:clip_vision_shapes",
                        write="genvis_jax.convert.clip:write_teacher_npz"),
    "dinov2": Kind("genvis_jax.convert.dinov2:convert_dinov2",
                   expected="genvis_jax.convert.dinov2:dinov2_shapes",
                   write="genvis_jax.convert.clip:write_teacher_npz"),
}


def _kind(kind: str) -> Kind:
  if kind not in KINDS:
    raise errors.ConfigError(
        f"Unknown conversion kind {kind!r}; choose one of {sorted(KINDS)}.")
  return KINDS[kind]


def model_shapes(model_config):
  """Abstract (ShapeDtypeStruct) params of ``models.build(model_config)``."""
  return jax.eval_shape(lambda r: models.init_params(model_config, r),
                        jax.random.key(0))


def write_orbax(dst: str, params, state_dict) -> None:
  """Parameter-only Orbax checkpoint ``dst/params`` (read by ``init_from``)."""
  del state_dict
  save_params(dst, params)


def from_torch(kind: str, state_dict: dict[str, Any], model_config) -> dict:
  """Official ``{name: array}`` -> Flax params of ``kind`` fitting ``model_config``.

  Returns numpy leaves (possibly transposed views) in the model's parameter
  dtypes; ``jax.device_put`` them before ``apply``. Raises
  ``CheckpointMismatchError`` (missing / unexpected / mis-shaped keys, in Flax
  naming; unrecognised official keys keep their official name).
  """
  spec = _kind(kind)
  if spec.needs_config and model_config is None:
    raise errors.ConfigError(f"Kind {kind!r} needs the model config the "
                             "checkpoint must fit (--config=configs/X.py).")
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  params = registry.function(spec.convert)(state_dict, model_config)
  expected = registry.function(spec.expected)(model_config)
  compare_trees(expected, params, f"The {kind!r} checkpoint")
  return jax.tree_util.tree_map(
      lambda e, p: np.asarray(p).astype(e.dtype, copy=False), expected, params)


def _check_dst(dst: str, overwrite: bool) -> None:
  if not dst:
    raise errors.ConfigError("--dst is required (where to write the converted weights).")
  full = os.fspath(dst)
  non_empty = os.path.isfile(full) or (os.path.isdir(full) and os.listdir(full))
  if non_empty and not overwrite:
    raise errors.OutputExistsError(f"{full} exists and is not empty; pass "
                                   "--overwrite to replace it, or choose "
                                   "another --dst.")


def load_sources(src: str | Sequence[str], key: str | None = None) -> dict:
  """Reads and merges one or more files (a comma-separated string or a list)."""
  paths = [p for p in (src.split(",") if isinstance(src, str) else src) if p]
  if not paths:
    raise errors.ConfigError("--src is required (the official checkpoint file).")
  state: dict = {}
  for path in paths:
    part = io.load_state_dict(path, key)
    clash = sorted(set(part) & set(state))
    if clash:
      raise errors.ConfigError(
          f"{path} repeats keys of an earlier --src file: {clash[:10]}.")
    state.update(part)
  return state


def convert_file(kind: str, src: str | Sequence[str], model_config, dst: str, *,
                 key: str | None = None, overwrite: bool = False) -> dict:
  """Reads ``src``, converts and checks it, then writes ``dst``; returns params.

  Nothing is written unless the checkpoint fits; a non-empty ``dst`` is refused
  unless ``overwrite``.
  """
  spec = _kind(kind)
  _check_dst(dst, overwrite)
  state = load_sources(src, key)
  params = from_torch(kind, state, model_config)
  registry.function(spec.write)(dst, params, state)
  return params
