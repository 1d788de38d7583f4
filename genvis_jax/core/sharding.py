"""Device mesh and logical-axis sharding.

One rules table (``config.sharding.rules``, default ``DEFAULT_RULES`` below)
maps logical axis names (carried by every parameter, see
``models/layers/__init__.py``) to mesh axes. A dimension keeps the longest
leading run of its mesh axes whose sizes' product divides it (``fit_spec``),
so a 3-channel conv or a 48-wide norm stays replicated while the large
matrices are split.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from genvis_jax import errors

# Logical axis -> mesh axes: the package's one table. configs/base.py sets it
# as config.sharding.rules (where a run may edit it); code that gets no table
# (no rules argument, no ``nn.logical_axis_rules`` context) uses this one.
DEFAULT_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),     # attention kernels' heads (Pallas shard_map)
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("pos", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("codebook_dim", None),
)

BATCH_AXES = dict(DEFAULT_RULES)["batch"]   # the default table's batch split


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves one ``-1`` entry of ``mesh_config.shape`` (axis name -> size)
  and validates the product.

  Returns axis name -> size, sizes >= 1 multiplying to ``num_devices``.
  Raises ``ConfigError`` naming ``config.mesh.shape``: a size that is neither
  a positive int nor -1, more than one -1, or a product that does not fit.
  """
  shape = dict(mesh_config.shape)
  return _resolve_sizes(shape, num_devices, f"config.mesh.shape {shape}",
                        "devices")


def _resolve_sizes(sizes: dict, total: int, where: str, unit: str
                   ) -> dict[str, int]:
  """``sizes`` (name -> size) with its one ``-1`` resolved so that they
  multiply to ``total`` (``unit``: what they count, "devices" / "slices");
  ``ConfigError``s begin with ``where``, the setting and its value."""
  sizes = dict(sizes)
  bad = {k: v for k, v in sizes.items()
         if not isinstance(v, (int, np.integer)) or isinstance(v, bool)
         or v < -1 or v == 0}
  if bad:
    raise errors.ConfigError(
        f"{where}: sizes {bad} are not positive ints; give each axis a size "
        f">= 1, or -1 (one axis) for the remaining {unit}.")
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise errors.ConfigError(
        f"{where}: at most one axis may be -1 (the remaining {unit}); give "
        f"the others of {free} fixed sizes.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if total % fixed:
      raise errors.ConfigError(
          f"{where}: the fixed axes ({fixed}) do not divide the {total} "
          f"{unit}. Choose sizes whose product divides {total}.")
    sizes[free[0]] = total // fixed
  if math.prod(sizes.values()) != total:
    raise errors.ConfigError(
        f"{where} needs {math.prod(sizes.values())} {unit} but {total} are "
        "available. Set one axis to -1 or fix the sizes.")
  return sizes


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh; axes are ``Auto`` (GSPMD propagation + logical constraints).

  Auto is chosen on purpose: parameters get explicit shardings from the rules
  table and activations get ``nn.with_logical_constraint`` hints; newer jax's
  Explicit default would make every op's sharding part of its type. Devices
  of several TPU slices (multislice) are laid out by ``device_grid``.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  names = tuple(shape)
  return Mesh(device_grid(shape, devices, mesh_config.get("dcn_shape")), names,
              axis_types=(AxisType.Auto,) * len(names))


# jax.make_mesh's rule: TPU v5e slices may split a physical axis over two
# mesh axes.
_SPLIT_PHYSICAL_AXES = ("TPU v5 lite", "TPU v5e")


def device_grid(shape: dict[str, int], devices: Sequence, dcn_shape=None
                ) -> np.ndarray:
  """The devices as an array of ``shape`` (axis name -> size, in order),
  adjacent in the interconnect along each axis.

  On one slice (devices without ``slice_index``, or all of one) this is
  ``jax.make_mesh``'s layout, except that a shape for which jax finds no
  layout on whole physical axes of the slice's torus (``jax.make_mesh``
  raises) is laid out with physical axes split, and said (logged). Across N
  TPU slices, which talk over the
  slower data-centre network (DCN), ``dcn_shape`` (``config.mesh.dcn_shape``,
  axis name -> how many slices the axis spans; default: all N on ``data``)
  says which axes cross it; each axis keeps ``shape[a] / dcn_shape[a]``
  inside a slice (``mesh_utils.create_hybrid_device_mesh``, as MaxText's
  ``dcn_*_parallelism``). Data parallelism over DCN leaves one gradient
  all-reduce per step on it; ``fsdp`` over DCN would gather weights across
  it in every layer. On one slice only counts of 1 fit: a count above 1
  there is refused (hosts that each see only their own slice, not the job's
  others, are named rather than run apart).

  Raises:
    ConfigError: naming ``config.mesh.dcn_shape``: an axis the mesh lacks,
      sizes not positive, a product other than the slice count, or an axis
      whose size the slice count does not divide.
  """
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  dcn = _dcn_shape(dict(dcn_shape or {"data": -1}), shape, slices)
  per_slice = {a: n // dcn.get(a, 1) for a, n in shape.items()}
  if slices == 1:
    grid = functools.partial(mesh_utils.create_device_mesh,
                             tuple(shape.values()), devices)
  else:
    grid = functools.partial(
        mesh_utils.create_hybrid_device_mesh, list(per_slice.values()),
        [dcn.get(a, 1) for a in shape], devices)
  split = devices[0].device_kind in _SPLIT_PHYSICAL_AXES
  try:
    return grid(allow_split_physical_axes=split)
  except NotImplementedError as e:
    if split:
      raise
    # e.g. data=8,fsdp=8 on a 4x4x4 TPU v4 slice: jax.make_mesh stops
    # there, the run can go on.
    logging.warning(
        "jax finds no layout of the mesh %s (per slice) on whole physical "
        "axes of these %s chips: %s It is laid out with physical axes split "
        "between mesh axes, whose collectives then run over part of a ring.",
        per_slice, devices[0].device_kind, errors.first_line(e, limit=1000))
    return grid(allow_split_physical_axes=True)


def _dcn_shape(dcn: dict, shape: dict[str, int], slices: int) -> dict[str, int]:
  """``config.mesh.dcn_shape`` resolved as ``mesh_shape`` resolves the
  mesh's (one ``-1`` takes the remaining slices) and checked against
  ``shape``: axes the mesh lacks may only be 1, and each count must divide
  its axis's size; ConfigError naming it otherwise."""
  where = (f"config.mesh.dcn_shape {dcn} (how many TPU slices each mesh axis "
           f"spans; {slices} slice(s) here, mesh {shape})")
  dcn = _resolve_sizes(dcn, slices, where, "slices")
  unknown = sorted(k for k, v in dcn.items() if k not in shape and v != 1)
  if unknown:
    raise errors.ConfigError(f"{where}: {unknown} are not mesh axes; use "
                             f"{sorted(shape)}.")
  uneven = {a: n for a, n in dcn.items() if n > 1 and shape[a] % n}
  if uneven:
    raise errors.ConfigError(
        f"{where}: the slice counts {uneven} do not divide those axes' sizes; "
        "give each such axis a size that is a multiple of its count, or let "
        "another axis span the slices (--config.mesh.dcn_shape.<axis>).")
  return dcn


def auto_axes(mesh: Mesh | None) -> Mesh | None:
  """``mesh`` with ``Auto`` axes (same devices, names and shape; None stays
  None), as ``create_mesh`` makes them. The entry points that take a
  caller's mesh pass it through this: ``jax.make_mesh``'s default Explicit
  axes made the models' gathers fail deep in tracing ("Use
  ``.at[...].get(out_sharding=)``"), as every sharding here is chosen for
  GSPMD propagation."""
  if mesh is None or all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def data_mesh(devices: Sequence[jax.Device]) -> Mesh:
  """1-D ``("data",)`` mesh (``Auto`` axis) for inference: batches split, weights
  replicated.

  ``devices`` is explicit because the callers differ on purpose: sampling splits
  one global batch over ``jax.devices()``; pre-tokenizing and evaluation run
  each process on its own rows over ``jax.local_devices()``.
  """
  devices = list(devices)
  return Mesh(device_grid({"data": len(devices)}, devices), ("data",),
              axis_types=(AxisType.Auto,))


def rules_tuple(rules) -> tuple:
  """Normalises config rules (ConfigDict may turn tuples into lists)."""
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """``spec`` with, per dimension, the longest leading run of its mesh axes
  whose sizes' product divides the dimension (an axis after one that does
  not fit is dropped too, even if it divides alone: the order of a
  dimension's axes is its device layout), then without axes of size 1.
  ``mesh``: a Mesh or AbstractMesh; ``spec`` axes ``mesh`` lacks are
  dropped."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_t = tuple(a for a in spec_axes(axes) if a in mesh.shape)
    # Keep the longest prefix of axes whose product divides the dimension.
    keep = []
    for a in axes_t:
      if dim % (math.prod(mesh.shape[b] for b in keep) * mesh.shape[a]) == 0:
        keep.append(a)
      else:
        break
    keep = [a for a in keep if mesh.shape[a] > 1] or None
    fitted.append(None if keep is None else
                  (keep[0] if len(keep) == 1 else tuple(keep)))
  return P(*fitted)


def spec_axes(entry) -> tuple:
  """A spec entry's mesh axes: None -> (), "data" -> ("data",), a tuple
  as it is."""
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def logical_sharding(names: Sequence[str | None] | None, shape: Sequence[int],
                     mesh: Mesh, rules) -> NamedSharding:
  """NamedSharding for one array with logical axis ``names``."""
  if not names:
    return NamedSharding(mesh, P())
  spec = nn.logical_to_mesh_axes(tuple(names), rules_tuple(rules))
  return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def tree_shardings(abstract_boxed, mesh: Mesh, rules):
  """Shardings for a pytree whose leaves may be ``nn.LogicallyPartitioned``.

  Returns a tree with the structure of ``nn.unbox(abstract_boxed)``.
  """
  def leaf(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return logical_sharding(x.names, x.value.shape, mesh, rules)
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
      leaf, abstract_boxed,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_axes(mesh, rules=None) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over: those of the rules
  table's ``"batch"`` entry (``BATCH_AXES`` without ``rules``) that ``mesh``
  has. The input batches, the micro-batch split and the activation
  constraints all follow it, so they cannot disagree.

  Raises:
    ConfigError: ``rules`` without a ``"batch"`` entry (Flax's constraints
      would replicate the batch while the inputs were split).
  """
  if not rules:
    axes = BATCH_AXES
  else:
    table = dict(rules_tuple(rules))
    if "batch" not in table:
      raise errors.ConfigError(
          "config.sharding.rules has no \"batch\" entry: the inputs and the "
          "activation constraints would split the batch differently. Add "
          "(\"batch\", (\"data\", \"fsdp\")) (the default), or "
          "(\"batch\", None) to give every device the whole batch.")
    axes = table["batch"]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Leading (batch) dimension split over ``batch_axes(mesh, rules)``."""
  return NamedSharding(mesh, P(batch_axes(mesh, rules)))


def num_batch_shards(mesh: Mesh, rules=None) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes
  (a global batch must be a multiple of it)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of ``mesh`` (inference weights, keys,
  scalars)."""
  return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
  """Host arrays, equal on every process (weights read from files) -> a
  whole copy of each on every device of ``mesh`` (``replicated``); see
  ``put_host``."""
  return put_host(tree, replicated(mesh))


def put_host(tree, shardings):
  """Host arrays, equal on every process (weights read from files) -> jax
  arrays on ``shardings`` (one sharding for every leaf, or a tree of them).

  Each process puts the shards of its own devices
  (``jax.make_array_from_callback``): ``jax.device_put`` of host data onto a
  mesh spanning several processes first checks that they agree by gathering
  every process's copy onto every device, P times the largest leaf of
  device memory at once (a CLIP ViT-L teacher on 64 hosts: ~77 GB gathered
  per host at start-up).
  """
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding,
                                        lambda index: x[index])
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
  return jax.tree_util.tree_map(put, tree, shardings)


def check_batch_divisible(global_batch: int, mesh: Mesh, micro_batches: int = 1,
                          rules=None):
  """Raises before compiling when the batch cannot be split as configured
  (across the batch axes' devices and micro-batches, and into data groups:
  ``data_groups``)."""
  shards = num_batch_shards(mesh, rules)
  if global_batch % (shards * micro_batches):
    raise errors.ConfigError(
        f"config.train.global_batch_size={global_batch} does not divide across "
        f"{shards} data-parallel devices x {micro_batches} micro-batches "
        f"(mesh {dict(mesh.shape)}). Use a multiple of {shards * micro_batches}.")
  data_groups(mesh, global_batch, rules)


def data_groups(mesh: Mesh, global_batch: int, rules=None) -> tuple[int, int]:
  """``(group, count)``: this process's data group and how many there are.

  A process feeds the rows of the global batch its devices hold. Processes
  whose devices hold the same rows (an axis outside the batch rule spans
  hosts, e.g. ``tensor`` wider than a host's chips) must feed the same
  examples (``jax.make_array_from_process_local_data``: replicas' data must
  be identical), so they form one group and read one shard of the data;
  groups hold disjoint rows. On the usual meshes, whose cross-host axes all
  split the batch, each process is its own group: ``(process_index,
  process_count)``.

  Raises:
    ConfigError: processes hold overlapping but different rows, or groups of
      different sizes (no input split feeds such a mesh).
  """
  index_map = batch_sharding(mesh, rules).devices_indices_map((global_batch,))
  rows: dict[int, set] = {}
  for device, index in index_map.items():
    start, stop, _ = index[0].indices(global_batch)
    rows.setdefault(device.process_index, set()).add((start, stop))
  return _group_of(rows, global_batch, jax.process_index(), mesh, rules)


def _group_of(rows: dict[int, set], global_batch: int, process: int, mesh,
              rules) -> tuple[int, int]:
  """``data_groups`` on ``rows`` (process -> its (start, stop) row ranges)."""
  groups = sorted({tuple(sorted(r)) for r in rows.values()})
  held = sorted(r for g in groups for r in g)
  # The groups' ranges tile the batch (each row held by one group), and
  # every group feeds as many rows.
  tiled = [a for a, _ in held] == [0] + [b for _, b in held[:-1]] and (
      held[-1][1] == global_batch)
  if not tiled or len({sum(b - a for a, b in g) for g in groups}) != 1:
    raise errors.ConfigError(
        f"The mesh {dict(mesh.shape)} splits the batch over "
        f"{batch_axes(mesh, rules)} so that processes hold overlapping but "
        f"different rows of it (rows by process: "
        f"{ {p: sorted(r) for p, r in sorted(rows.items())} }): no input "
        "split can feed that. Put the mesh axes that span hosts in the batch "
        "rule (config.sharding.rules), or give them a size that a host's "
        "devices cover (config.mesh.shape).")
  return groups.index(tuple(sorted(rows[process]))), len(groups)


def host_to_global(local_batch: dict[str, np.ndarray], mesh: Mesh,
                   global_batch: int, rules=None) -> dict:
  """Assembles process-local numpy batches (this process's data group's
  rows, see ``data_groups``) into ``global_batch``-row, batch-sharded
  jax.Arrays. The global shape is given, not inferred: JAX would take
  processes that share rows for holders of different ones."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), (global_batch,) + np.shape(x)[1:]),
      local_batch)
