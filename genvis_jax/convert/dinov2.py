"""Hugging Face DINOv2 weights (``facebook/dinov2-small``, ``-base``:
``model.safetensors`` / ``pytorch_model.bin`` of a Dinov2Model, or a
Dinov2ForImageClassification whose ``dinov2.`` prefix is dropped with its
``classifier``) -> ``dinov2.Dinov2Model`` params.

Rename + transpose only, by the table ``NAMES`` (rules in ``convert/vit.py``):
  encoder.layer.5.attention.attention.query.weight (out, in)
      -> encoder/block_5/attn/q/kernel (in, out)
  encoder.layer.5.layer_scale1.lambda1 -> encoder/block_5/ls1/scale
  embeddings.patch_embeddings.projection.weight (D, 3, 14, 14)
      -> embed/patch_embed/kernel (14, 14, 3, D)
  embeddings.{cls_token (1, 1, D), mask_token (1, D), position_embeddings
      (1, 1 + G*G, D)} -> embed/{cls_token (D,), mask_token (D,), pos_embed}
  layernorm.weight -> norm/scale

transformers 5.x names (``attention.{q,k,v,o}_proj``) are mapped back to the
hub names. (The torch-hub / timm layout, ``blocks.{i}.attn.qkv``, is read by
``convert/dino_vit.py`` instead.) ``model_config``: ``"vit_s14"`` /
``"dinov2_s14"``, ``{name, **overrides}`` or HF config fields. CLI:
  python -m genvis_jax.convert --kind=dinov2 --src=model.safetensors \
      --config=genvis_jax/convert/dinov2.py:vit_s14 --dst=dinov2_s14.npz
"""

from __future__ import annotations

import ml_collections
import numpy as np

from genvis_jax.convert import vit as cvit
from genvis_jax import convert as convert_lib
from genvis_jax.convert import clip_vision
from genvis_jax.convert.clip_vision import named_module, tower_config
from genvis_jax.models import dinov2


CONFIG_FORM = "genvis_jax/convert/dinov2.py:NAME"
ADVICE = (f"Check that --config={CONFIG_FORM} names the tower the checkpoint "
          f"holds (NAME one of {sorted(dinov2.CONFIGS)}).")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CLI config: ``--config=genvis_jax/convert/dinov2.py:vit_b14`` (the tower's
  fields, overridable with ``--config.model.FIELD=...``)."""
  return tower_config(dinov2.dinov2, arg or "vit_s14")


def dinov2_module(model_config) -> dinov2.Dinov2Model:
  return named_module(model_config, dinov2.dinov2,
                      lambda f: dinov2.Dinov2Model(**f),
                      ("dinov2_", "vit_"))


_V5 = {".attention.q_proj.": ".attention.attention.query.",
       ".attention.k_proj.": ".attention.attention.key.",
       ".attention.v_proj.": ".attention.attention.value.",
       ".attention.o_proj.": ".attention.output.dense."}

NAMES = cvit.Names(
    top={"embeddings.patch_embeddings.projection": "embed/patch_embed",
         "layernorm": "norm"},
    tensors={"embeddings.cls_token": ("embed/cls_token", 1),
             "embeddings.mask_token": ("embed/mask_token", 1),
             "embeddings.position_embeddings": ("embed/pos_embed", 2)},
    blocks=r"encoder\.layer\.(\d+)",
    block={"norm1": "norm1", "norm2": "norm2",
           "attention.attention.query": "attn/q",
           "attention.attention.key": "attn/k",
           "attention.attention.value": "attn/v",
           "attention.output.dense": "attn/out",
           "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"},
    block_tensors={"layer_scale1.lambda1": ("ls1/scale", 1),
                   "layer_scale2.lambda1": ("ls2/scale", 1)})


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """HF keys -> Flax params; shapes are checked by ``from_torch``."""
  del model_config
  state = {}
  for key, value in state_dict.items():
    if key.startswith("classifier."):
      continue
    for new, hub in _V5.items():     # transformers 5.x -> hub names
      key = key.replace(new, hub)
    state[key.removeprefix("dinov2.")] = value
  return cvit.convert_names(state, NAMES)


def expected(model_config):
  """The converted tree's shapes: the tower ``model_config`` names, abstract."""
  module = dinov2_module(model_config)
  return convert_lib.module_shapes(
      module, *dinov2.example_inputs(module, 1, module.image_size))


write = clip_vision.write  # the same teacher .npz as CLIP
