"""FQGAN tokenizer training: the tokenizer task plus disentanglement and
representation learning (specs/fqgan.md, "Losses").

Generator loss = rec_w * pixel + lpips_w * LPIPS + quantizer (sum over
sub-codebooks) + disentangle_weight * eq. 7 + rep_weight * sum over feature
heads of InfoNCE(predicted CLS, teacher CLS) + gan weight * adversarial.

Teachers come from ``config.teachers``, a tuple of ConfigDicts
``{name, path, head, kwargs}``: ``name`` is a ``genvis_jax.models.teachers``
registry entry, ``path`` a local weights file (empty = that teacher is off),
``head`` the branch whose feature head it supervises (``model.feat_heads``),
``kwargs`` extra arguments of the teacher factory. Teacher weights are a frozen
group ("teachers") read by ``frozen_params()``; with no teacher file the
representation loss is off and the log says so. Override a path with
``--config.teachers[0].path=FILE.npz``.

The official discriminator loss is scaled by the GAN weight (0.5) too; with
``config.loss.disc_loss_weight`` the discriminator's gradients are scaled the
same way before clipping (the logged ``disc_loss`` stays unscaled).

The batch-coupled terms follow the official per-GPU batch of 32 images
(``loss.rep_group_size``, ``model.entropy_group_size``, the PatchGAN's
BatchNorm groups). One difference is kept: the official loss module runs in
train mode, so LPIPS's linear layers apply their Dropout(0.5); ours does not
(the dropout only adds zero-mean noise to the perceptual term).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from genvis_jax import errors
from genvis_jax.convert import clip_vision as convert_clip
from genvis_jax.models import teachers as teachers_lib
from genvis_jax.models.quantizers import l2_normalize
from genvis_jax.train.tasks.tokenizer import TokenizerTask


def info_nce(pred: jax.Array, target: jax.Array, group_size: int = 0):
  """One-direction in-batch InfoNCE, temperature 1 (FQGAN's semantic loss).

  pred, target: (B, D). Both are L2-normalised, target is a constant;
  loss = -mean_i log softmax_j(pred_i . target_j)[i]. With ``group_size`` > 0
  the batch is split into consecutive groups of that size, each its own set of
  negatives (the official loss ran per GPU on 32 images); the mean over groups
  is returned.
  """
  b, d = pred.shape
  if target.shape != (b, d):
    raise errors.ConfigError(
        f"Predicted features {pred.shape} and teacher features "
        f"{target.shape} differ; the feature head width must "
        f"equal the teacher's CLS width.")
  g = group_size or b
  if b % g:
    raise errors.ConfigError(
        f"Batch {b} is not divisible by loss.rep_group_size {g}.")
  p = l2_normalize(pred.astype(jnp.float32)).reshape(b // g, g, d)
  t = jax.lax.stop_gradient(
      l2_normalize(target.astype(jnp.float32))).reshape(b // g, g, d)
  logits = jnp.einsum("gid,gjd->gij", p, t, precision=jax.lax.Precision.HIGHEST)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.diagonal(logp, axis1=1, axis2=2))


@dataclasses.dataclass(frozen=True)
class Teacher:
  head: str                 # branch whose FeatPredHead it supervises
  name: str
  path: str
  module: Any
  preprocess: Callable


def build_teachers(config) -> list[Teacher]:
  """Teachers with a weights file, validated against the model's feat heads."""
  heads = {str(b): int(w) for b, w in config.model.get("feat_heads", ())}
  out = []
  for entry in config.get("teachers", ()):
    name, path, head = entry.name, entry.get("path", ""), entry.head
    if head not in heads:
      raise errors.ConfigError(
          f"Teacher {name!r} supervises head {head!r}, but "
          f"model.feat_heads has {sorted(heads)}; fix "
          f"config.teachers or config.model.feat_heads.")
    if not path:
      logging.warning("Representation loss for head %r is OFF: teacher %r has "
                      "no weights file (set config.teachers[i].path).", head,
                      name)
      continue
    kwargs = dict(entry.get("kwargs", {}) or {})
    kwargs.setdefault("dtype", config.model.get("dtype", "float32"))
    module, preprocess = teachers_lib.get_teacher(name, **kwargs)
    out.append(Teacher(head, name, path, module, preprocess))
  if not out and heads:
    logging.warning("Representation loss is OFF: no teacher weights configured "
                    "(config.teachers[i].path); only the disentanglement term "
                    "regularises the semantic branches.")
  return out


class FQTokenizerTask(TokenizerTask):
  """Batch: {"image": (B, H, W, 3) in ``value_range`` ([-1, 1] for FQGAN)}."""

  def __init__(self, config):
    super().__init__(config)
    # Single-codebook tokenizers (llamagen_vq, the k = 1 case) train here too.
    self._has_features = "with_features" in inspect.signature(
        type(self.model).__call__).parameters
    self.teachers = build_teachers(config)
    self.rep_weight = float(self.hparam("loss.rep_weight")) if self.teachers else 0.0
    self.use_rep = bool(self.rep_weight)
    self.rep_group_size = (int(self.hparam("loss.rep_group_size"))
                           if self.use_rep else 0)
    # FQGAN models (feature heads) report eq. 7; llamagen_vq has no such term.
    self.disentangle_weight = (float(self.hparam("loss.disentangle_weight"))
                               if self._has_features else 0.0)
    self._teacher_params = None

  def optimizers(self):
    opts = dict(super().optimizers())
    w = float(self.hparam("loss.disc_loss_weight"))
    if w != 1.0:
      opts["disc"] = optax.chain(optax.scale(w), opts["disc"])
    return opts

  def frozen_params(self):
    frozen = dict(super().frozen_params())
    if self.use_rep:
      if self._teacher_params is None:
        self._teacher_params = {t.head: self._load_teacher(t)
                                for t in self.teachers}
      frozen["teachers"] = self._teacher_params
    return frozen

  def frozen_axes(self):
    """The teachers' (FQGAN's CLIP ViT-L/14: 303M parameters, 1.13 GiB in
    fp32) split as trained weights are."""
    axes = dict(super().frozen_axes())
    if self.use_rep:
      axes["teachers"] = {t.head: jax.eval_shape(
          lambda k, t=t: t.module.init(k, self._teacher_input(t)),
          jax.random.key(0))["params"] for t in self.teachers}
    return axes

  def _teacher_input(self, t: Teacher) -> jax.Array:
    size = self.config.data.image_size
    return t.preprocess(jnp.zeros((1, size, size, 3)), self.value_range)

  def _load_teacher(self, t: Teacher):
    params = convert_clip.load_teacher_params(t.path)
    x = self._teacher_input(t)
    try:
      out = jax.eval_shape(lambda p: t.module.apply({"params": p}, x), params)
    except Exception as e:  # Flax scope errors name the missing/odd parameter
      raise errors.ConfigError(
          f"Teacher weights {t.path!r} do not fit teacher {t.name!r} with "
          f"the kwargs of config.teachers ({errors.first_line(e)[:300]}): "
          "convert the tower that name builds (README: \"Where the files "
          "come from\"), or set its name / kwargs to the tower the file "
          "holds.") from e
    width = dict((str(b), int(w)) for b, w in self.config.model.feat_heads)[t.head]
    if out.shape != (1, width):
      raise errors.ConfigError(
          f"Teacher {t.name!r} ({t.path}) gives CLS features of "
          f"shape {out.shape[1:]}, head {t.head!r} predicts "
          f"({width},); set its width in model.feat_heads.")
    logging.info("Representation loss ON for head %r: teacher %r from %s",
                 t.head, t.name, t.path)
    return params

  def representation_losses(self, frozen, images, features):
    """{head: InfoNCE} for every configured teacher (``frozen["teachers"]``)."""
    out = {}
    for t in self.teachers:
      p = jax.lax.stop_gradient(frozen["teachers"][t.head])
      target = t.module.apply({"params": p}, t.preprocess(images,
                                                          self.value_range))
      out[t.head] = info_nce(features[t.head], target,
                             self.rep_group_size)
    return out

  def forward_kwargs(self):
    # Single-codebook models (llamagen_vq) have no feature heads.
    return {"with_features": self.use_rep} if self._has_features else {}

  def extra_terms(self, total, frozen, images, aux, metrics):
    """+ disentangle_weight * eq. 7 + rep_weight * InfoNCE per teacher."""
    if "disentangle_loss" in aux:
      total = total + self.disentangle_weight * aux["disentangle_loss"]
    if self.use_rep:
      rep = self.representation_losses(frozen, images, aux["features"])
      for head, v in rep.items():
        total = total + self.rep_weight * v
        metrics[f"rep_loss/{head}"] = v
    return total


TASK = FQTokenizerTask
