"""Hugging Face CLIP weights (``openai/clip-vit-large-patch14``,
``openai/clip-vit-base-patch16``: ``pytorch_model.bin`` / ``model.safetensors``
of a CLIPModel or CLIPVisionModel) -> ``clip_vision.CLIPVisionModel`` params.

Rename + transpose only, by the table ``NAMES`` (rules in ``convert/vit.py``):
  vision_model.encoder.layers.3.self_attn.q_proj.weight (out, in)
      -> encoder/block_3/attn/q/kernel (in, out)
  vision_model.embeddings.patch_embedding.weight (D, 3, p, p)
      -> embed/patch_embed/kernel (p, p, 3, D)
  vision_model.embeddings.position_embedding.weight -> embed/pos_embed
  vision_model.pre_layrnorm.weight -> pre_norm/scale
The text tower, ``visual_projection``, ``text_projection``, ``logit_scale`` and
the ``position_ids`` buffer are dropped. A CLIPVisionModel saved by transformers
5.x (no ``vision_model.`` prefix) is read too.

``model_config`` names the tower: ``"vit_l14"`` / ``"clip_vit_l14"``, or a
mapping with ``name`` and field overrides, or HF config fields. The CLI reads
it from this file (``--dst`` is the ``.npz`` that ``load_teacher_params``
reads):
  python -m genvis_jax.convert --kind=clip_vision --src=model.safetensors \
      --config=genvis_jax/convert/clip_vision.py:vit_l14 --dst=clip_vit_l14.npz
"""

from __future__ import annotations

import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from genvis_jax import convert as convert_lib
from genvis_jax import errors
from genvis_jax.convert import vit as cvit
from genvis_jax.core import files
from genvis_jax.models import clip_vision

_DROP_PREFIXES = ("text_model.", "visual_projection.", "text_projection.",
                  "logit_scale", "vision_model.embeddings.position_ids")
_TOWER = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")

NAMES = cvit.Names(
    top={"embeddings.patch_embedding": "embed/patch_embed",
         "pre_layrnorm": "pre_norm", "post_layernorm": "post_norm"},
    tensors={"embeddings.class_embedding": ("embed/cls_token", 1),
             "embeddings.position_embedding.weight": ("embed/pos_embed", 2)},
    blocks=r"encoder\.layers\.(\d+)",
    block={"layer_norm1": "norm1", "layer_norm2": "norm2",
           "self_attn.q_proj": "attn/q", "self_attn.k_proj": "attn/k",
           "self_attn.v_proj": "attn/v", "self_attn.out_proj": "attn/out",
           "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"})


CONFIG_FORM = "genvis_jax/convert/clip_vision.py:NAME"
ADVICE = (f"Check that --config={CONFIG_FORM} names the tower the checkpoint "
          f"holds (NAME one of {sorted(clip_vision.CONFIGS)}).")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CLI config: ``--config=genvis_jax/convert/clip_vision.py:vit_b16`` (the tower's
  fields, overridable with ``--config.model.FIELD=...``)."""
  return tower_config(clip_vision.clip_vision, arg or "vit_l14")


def tower_config(build_named, name: str) -> ml_collections.ConfigDict:
  """``{model: {name, <architecture fields of that tower>}}``."""
  module = build_named(name)
  skip = ("output", "dtype", "param_dtype", "parent", "name")
  fields = {f: getattr(module, f) for f in module.__dataclass_fields__
            if f not in skip}
  return ml_collections.ConfigDict({"model": {"name": name, **fields}})


def named_module(model_config, build_named, from_fields, alias: tuple[str, str]):
  """Module from a name string, ``{name, **overrides}`` or plain fields; a
  family-prefixed name (``clip_vit_l14``, ``dinov2_s14``) is mapped by
  ``alias`` = (family prefix, config prefix)."""
  def resolve(name):
    return alias[1] + name[len(alias[0]):] if name.startswith(alias[0]) else name

  if model_config is None:
    raise errors.ConfigError("Say which tower the checkpoint is: model_config='vit_l14' "
                     "(CLI: --config=genvis_jax/convert/<kind file>.py:NAME).")
  if isinstance(model_config, str):
    return build_named(resolve(model_config))
  fields = dict(model_config)
  name = fields.pop("name", None)
  if name:
    return build_named(resolve(name), **fields)
  return from_fields(fields)


def clip_module(model_config) -> clip_vision.CLIPVisionModel:
  return named_module(model_config, clip_vision.clip_vision,
                      lambda f: clip_vision.CLIPVisionModel(**f),
                      ("clip_vit_", "vit_"))


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """HF keys -> Flax params; shapes are checked by ``from_torch``."""
  del model_config
  state = {}
  for key, value in state_dict.items():
    if key.startswith(_TOWER):       # a transformers 5.x CLIPVisionModel
      key = "vision_model." + key
    if not key.startswith(_DROP_PREFIXES):
      state[key.removeprefix("vision_model.")] = value
  return cvit.convert_names(state, NAMES)


def expected(model_config):
  """The converted tree's shapes: the tower ``model_config`` names, abstract."""
  module = clip_module(model_config)
  return convert_lib.module_shapes(module, *clip_vision.example_inputs(module))


def write(dst: str, params, state_dict) -> None:
  """Teacher weights as the ``.npz`` that ``load_teacher_params`` reads."""
  del state_dict
  if not dst.endswith(".npz"):
    raise errors.ConfigError(f"--dst for a teacher kind is an .npz file, got {dst!r}.")
  save_teacher_params(dst, params)


def save_teacher_params(path: str, params) -> None:
  """Writes a params pytree as ``.npz`` with '/'-joined Flax paths as keys."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  files.write_whole(path, lambda tmp: np.savez(tmp, **arrays))   # or gs://


def load_teacher_params(path: str, setting: str = "config.teachers[i].path"):
  """Teacher params from the ``.npz`` :func:`write` makes (``--kind=clip_vision``
  or ``dinov2``), through ``convert.load_weights``; the task checks them by
  applying its teacher. Raises ``CheckpointFileNotFoundError`` (a
  FileNotFoundError) for a missing file, ``CheckpointFileError`` for an
  unreadable one or one holding official names."""
  return convert_lib.load_weights(
      path, setting=setting, what="teacher weights",
      fetch="Convert the teacher with `python -m genvis_jax.convert "
      "--kind=clip_vision` (or `--kind=dinov2`)")

