"""Checks that a mesh and the rules table put every device to use.

A mesh axis the rules never name, a rule naming an axis the mesh lacks, an
axis that splits almost none of a model's bytes and an axis whose size
divides too few of its dimensions each leave devices holding whole copies
and repeating one another's work; ``core/sharding.py`` builds the shardings
these checks judge.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh

from genvis_jax import errors
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import sharding as shd


# Parameter bytes left whole on an axis the rules split them over, as a
# share of the bytes they split over it, above which a run is told.
UNSPLIT_SHARE = 0.25


def _leaf_splits(abstract_boxed, mesh: Mesh, rules):
  """Per parameter leaf of ``abstract_boxed``: ``(path, shape, bytes, want,
  got)``, per dimension the mesh axes the rules ask for (``want``) and
  those ``fit_spec`` keeps on ``mesh`` (``got``); a leaf without logical
  names asks for none."""
  table = shd.rules_tuple(rules)
  flat = jax.tree_util.tree_flatten_with_path(
      abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, x in flat:
    named = isinstance(x, nn.LogicallyPartitioned) and x.names
    value = x.value if isinstance(x, nn.LogicallyPartitioned) else x
    shape, none = value.shape, (None,) * value.ndim
    want = got = none
    if named:
      spec = nn.logical_to_mesh_axes(tuple(x.names), table)
      want = tuple(spec)
      got = (tuple(shd.fit_spec(spec, shape, mesh)) + none)[:len(shape)]
    yield path, shape, value.size * value.dtype.itemsize, want, got


def unsplit_note(abstract_boxed, mesh: Mesh, rules) -> str:
  """Why a mesh axis (size > 1) shards less than the rules ask: the share
  of the parameter bytes the rules split over it that ``fit_spec`` leaves
  whole there, as the axis does not divide their dimensions (``fsdp=12``
  and a width of 1408: every kernel and its optimizer state whole on
  every device). "" where each axis splits more than
  ``1 - UNSPLIT_SHARE`` of its bytes. Names the largest such parameter and
  the sizes (up to the device count) that divide the dimensions of 95% of
  the bytes."""
  asked = {}   # mesh axis -> [(bytes, dimension, kept, name, shape)]
  for path, shape, nbytes, wants, gots in _leaf_splits(abstract_boxed, mesh,
                                                       rules):
    for dim, want, got in zip(shape, wants, gots):
      for a in shd.spec_axes(want):
        if a in mesh.shape and mesh.shape[a] > 1:
          asked.setdefault(a, []).append(
              (nbytes, dim, a in shd.spec_axes(got), fit.key_path(path), shape))
  notes = []
  for a, rows in sorted(asked.items()):
    total = sum(r[0] for r in rows)
    whole = sorted((r for r in rows if not r[2]), key=lambda r: -r[0])
    if sum(r[0] for r in whole) <= UNSPLIT_SHARE * total:
      continue
    # Each size whose dividing dimensions hold 95% of the bytes (a gcd over
    # the largest leaves let one small odd table, 2026 rows, rule out 4-10).
    fits = [d for d in range(2, mesh.size + 1)
            if sum(r[0] for r in rows if r[1] % d == 0) >= 0.95 * total]
    _, dim, _, name, shape = whole[0]
    notes.append(
        f"config.mesh.shape.{a}={mesh.shape[a]} divides too few parameter "
        f"dimensions: {sum(r[0] for r in whole) / 2**30:.2f} of the "
        f"{total / 2**30:.2f} GiB of parameters the rules split over '{a}' "
        f"stay whole on every device, and their optimizer state (e.g. "
        f"{name} {tuple(shape)}, dimension {dim}). Sizes up to the "
        f"{mesh.size} devices that divide most of them: {fits[-6:] or 'none'}.")
  return " ".join(notes)


IDLE_SHARE = 0.01   # below this share of the parameter bytes an axis idles


def check_axes_split(abstract_boxed, mesh: Mesh, rules) -> None:
  """Refuses a mesh axis of size > 1 that splits neither the batch nor at
  least ``IDLE_SHARE`` of this model's parameter bytes: the rules may name
  it (``tensor`` splits ``mlp`` / ``heads`` / ``vocab``) while the model
  hardly has such dimensions (a CNN tokenizer: only its codebook), so its
  devices would hold whole copies and repeat the same work.

  Raises:
    ConfigError: naming ``config.mesh.shape.<axis>``, the share it splits
      and the fix.
  """
  table = shd.rules_tuple(rules)
  idle = [a for a, n in mesh.shape.items()
          if n > 1 and a not in shd.batch_axes(mesh, rules)]
  if not idle:
    return
  total, split = 0, dict.fromkeys(idle, 0)
  for _, _, nbytes, _, got in _leaf_splits(abstract_boxed, mesh, rules):
    total += nbytes
    kept = {a for entry in got for a in shd.spec_axes(entry)}
    for a in idle:
      split[a] += nbytes if a in kept else 0
  for a in idle:
    if split[a] < IDLE_SHARE * total:
      raise errors.ConfigError(
          f"config.mesh.shape.{a}={mesh.shape[a]} splits "
          f"{split[a] / max(total, 1):.1%} of this model's parameter bytes "
          f"and not the batch: its {mesh.shape[a]} devices would each hold "
          "whole copies and repeat the same work (the rules split "
          f"{sorted(n for n, axes in table if a in shd.spec_axes(axes))} over it, "
          "dimensions this model hardly has). Give those devices to the "
          f"batch or to fsdp: --config.mesh.shape.{a}=1 with data or fsdp "
          "larger.")


def check_mesh_axes(mesh, rules) -> None:
  """Refuses a mesh the rules table cannot use: an axis of size > 1 that no
  rule names (its devices would each hold whole copies of every parameter
  and repeat one another's work; t5x / MaxText's ``model`` axis is
  ``tensor`` here), and a rule naming an axis that is neither in the mesh
  nor one of the default table's (a misspelt axis silently turns its split
  off). A default-table axis the mesh lacks is fine: those splits are off.

  Raises:
    ConfigError: naming the axis, ``config.mesh.shape`` /
      ``config.sharding.rules`` and the axes the other side knows.
  """
  table = shd.rules_tuple(rules)
  named = {a for _, axes in table for a in shd.spec_axes(axes)}
  known = {a for _, axes in shd.DEFAULT_RULES for a in shd.spec_axes(axes)}
  idle = [a for a, n in mesh.shape.items() if n > 1 and a not in named]
  if idle:
    raise errors.ConfigError(
        f"config.mesh.shape names axis {idle[0]!r} (size "
        f"{mesh.shape[idle[0]]}), which no rule of config.sharding.rules "
        f"splits over: its devices would hold whole copies of every "
        f"parameter and repeat the same work. The rules split over "
        f"{sorted(named)}; rename the axis (tensor parallelism is 'tensor') "
        "or add a rule that uses it.")
  stray = sorted(named - set(mesh.shape) - known)
  if stray:
    raise errors.ConfigError(
        f"config.sharding.rules splits over axis {stray[0]!r}, which "
        f"config.mesh.shape {dict(mesh.shape)} does not have, so that split "
        f"is silently off. Use one of the mesh's axes {list(mesh.shape)} or "
        "add the axis to config.mesh.shape.")
