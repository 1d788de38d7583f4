"""The frozen weights a memory plan holds, planned by their shapes.

A teacher or a tokenizer the config sets no weights file for is planned
from its parameter shapes (nothing is read), placed as the trainer places
loaded weights (``train.state.frozen_shardings``: split by the rules, as
trained weights are), and the train step compiled for them
(``bench/plan_memory.py`` reads them for its ``frozen GiB`` column and its
compiled memory).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# The weights-file path of a teacher planned by its shapes.
PLANNED = "(planned by its shapes)"


def plan_teachers_by_shapes(config) -> None:
  """Sets ``config``'s teachers without a file to ``PLANNED`` (none is
  read), where the model takes them (a ``runlocal``'s narrower feature heads
  do not take the paper's tower): FQGAN's ``teachers[i].path``, and the
  Equivariant tokenizer's ``loss.teacher_path`` where its semantic loss is
  on."""
  for teacher in config.get("teachers", ()):
    if not teacher.path and _teacher_fits(config, teacher):
      teacher.path = PLANNED
  loss = config.get("loss") or {}
  if ("teacher_path" in loss and loss.get("semantic_weight")
      and config.model.get("semantic")):
    loss.teacher_path = loss.teacher_path or PLANNED


def _teacher_fits(config, teacher) -> bool:
  """Whether FQGAN's feature head ``teacher.head`` is as wide as the CLS
  features of the tower ``teacher.name`` (traced, nothing read)."""
  from genvis_jax.models import teachers  # pylint: disable=import-outside-toplevel
  kwargs = dict(teacher.get("kwargs") or {})
  module, preprocess = teachers.get_teacher(teacher.name, **kwargs)
  size = config.data.image_size
  x = preprocess(jnp.zeros((1, size, size, 3)))
  width = jax.eval_shape(lambda k: module.apply(module.init(k, x), x),
                         jax.random.key(0)).shape[-1]
  heads = {str(b): int(w) for b, w in config.model.get("feat_heads", ())}
  return heads.get(str(teacher.head)) == width


def tokenizer_shapes(config, task):
  """A task encoding its images with a frozen tokenizer in the step (the
  Equivariant generator) whose config names no checkpoint: the tokenizer's
  parameter shapes, which the step is compiled with (no weights are read:
  ``task`` is set to need none); None for every other config."""
  if not task.encodes_with_tokenizer or config.tokenizer.get("checkpoint"):
    return None
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  from genvis_jax.models import inference  # pylint: disable=import-outside-toplevel
  tok_config = inference.data_model_config(config.tokenizer)
  boxed = jax.eval_shape(lambda k: models.init_params(tok_config, k, boxed=True),
                         jax.random.key(0))
  task.encodes_with_tokenizer = False   # this instance: no checkpoint needed
  task.frozen_params = lambda: {}
  # What the trainer holds of it: what the step's encode and the grids'
  # decode read.
  return {"tokenizer": inference.decoder_params(
      models.build(tok_config), tok_config, boxed, encode=True)}


def frozen_shapes(config, task):
  """The frozen weights ``plan`` compiles ``task``'s step with, boxed and
  abstract, where the config sets no file for them (``task`` is then set
  to read none): the Equivariant generator's tokenizer, or the teachers
  ``apply_overrides`` left to their shapes; None where the trainer reads
  them from their files."""
  return tokenizer_shapes(config, task) or _planned_frozen(config, task)


def _planned_frozen(config, task):
  """A task whose teachers ``apply_overrides`` left to their shapes: the
  frozen groups it names the axes of (``Task.frozen_axes``: the teachers,
  the Equivariant tokenizer's DINO ViT), boxed and abstract, with ``task``
  set to read no file (LPIPS, 59 MB, is then not counted); None for the
  others."""
  paths = [t.path for t in config.get("teachers", ())]
  paths.append((config.get("loss") or {}).get("teacher_path", ""))
  if PLANNED not in paths:
    return None
  task.frozen_params = lambda: {}
  return task.frozen_axes() or None


def placed_frozen(tr, frozen=None):
  """``(frozen weights, train step)``: the trainer's, or ``frozen`` (boxed
  abstract weights) placed as the trainer places loaded ones
  (``state.frozen_shardings``) and the step compiled for them."""
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  if frozen is None:
    return tr.frozen, tr._step  # pylint: disable=protected-access
  shapes = nn.unbox(frozen)
  shardings = state_lib.frozen_shardings(shapes, frozen, tr.mesh, tr.rules)
  step = step_lib.jit_train_step(
      tr._step_fn, tr.shardings,  # pylint: disable=protected-access
      shd.batch_sharding(tr.mesh, tr.rules), shd.replicated(tr.mesh),
      shardings)
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      shapes, shardings), step
