"""How the devices become a mesh: TPU slices' tori and several slices
(multislice, ``config.mesh.dcn_shape``), on stand-in devices with the
attributes ``jax.experimental.mesh_utils`` reads (``coords``, ``slice_index``),
and on the 8 fake CPU devices."""

import itertools
import logging
import types

import jax
import ml_collections
import numpy as np
import pytest
from jax.experimental import mesh_utils

from configs import base
from genvis_jax.core import sharding as shd
from genvis_jax.errors import ConfigError


def _slices(n_slices, per_slice, kind="cpu"):
  """Stand-ins for the devices of ``n_slices`` TPU slices (``slice_index``)."""
  return [types.SimpleNamespace(id=i, slice_index=i // per_slice,
                                process_index=i // per_slice, platform="cpu",
                                device_kind=kind)
          for i in range(n_slices * per_slice)]


def _slice_of(grid):
  return np.vectorize(lambda d: d.slice_index)(grid)


def test_a_multislice_mesh_keeps_axes_inside_a_slice_unless_told():
  """jax.make_mesh refuses devices of several slices; the mesh spans the
  slices with data (the default) or the axes config.mesh.dcn_shape names,
  and every other axis stays inside one slice (its interconnect)."""
  devices = _slices(2, 4)
  shape = {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="multi-slice"):
    jax.make_mesh((2, 4, 1), tuple(shape), devices=devices)
  grid = shd.device_grid(shape, devices)
  assert grid.shape == (2, 4, 1)
  # Each fsdp group (a row) lies in one slice; data crosses them.
  assert [set(row) for row in _slice_of(grid)[..., 0].tolist()] == [{0}, {1}]
  grid = shd.device_grid(shape, devices, {"data": 1, "fsdp": 2, "tensor": 1})
  assert [set(row) for row in _slice_of(grid)[..., 0].tolist()] == [{0, 1}] * 2
  # One data axis across 4 slices of 2 (the inference mesh's shape).
  grid = shd.device_grid({"data": 8}, _slices(4, 2))
  assert _slice_of(grid).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  # The default (data across the slices) on a mesh whose data axis they do
  # not divide names the way out.
  with pytest.raises(ConfigError, match="dcn_shape.<axis>"):
    shd.device_grid({"data": 1, "fsdp": 8}, devices)


@pytest.mark.parametrize("dcn, match", [
    ({"data": 3}, "needs 3 slices but 2 are available"),
    ({"data": -1, "fsdp": -1},
     "at most one axis may be -1 \\(the remaining slices\\)"),
    ({"data": 1, "model": 2}, "\\['model'\\] are not mesh axes"),
    ({"data": -1, "tensor": 4},
     "the fixed axes \\(4\\) do not divide the 2 slices"),
    ({"data": 1, "fsdp": 2, "tensor": 1}, None),
])
def test_a_multislice_dcn_shape_is_checked(dcn, match):
  shape = {"data": 2, "fsdp": 4, "tensor": 1}
  if match is None:
    shd.device_grid(shape, _slices(2, 4), dcn)
    return
  with pytest.raises(ConfigError, match="config.mesh.dcn_shape .*" + match):
    shd.device_grid(shape, _slices(2, 4), dcn)


def _torus(dims, kind="TPU v4"):
  """Stand-ins for one TPU slice's chips on a ``dims`` (x, y, z) torus."""
  coords = itertools.product(*(range(n) for n in dims[::-1]))
  return [types.SimpleNamespace(id=i, coords=(x, y, z), core_on_chip=0,
                                platform="tpu", device_kind=kind,
                                process_index=i // 4, slice_index=0)
          for i, (z, y, x) in enumerate(coords)]


def test_a_mesh_the_torus_cannot_hold_whole_is_laid_out_and_said(caplog):
  """data=8,fsdp=8 on a 4x4x4 TPU v4 slice (the README's 64-chip example):
  8 is no product of whole torus dimensions, and jax.make_mesh raised
  NotImplementedError at start. It is laid out with a physical axis split,
  and logged; a shape that maps whole is laid out as before, unlogged."""
  chips = _torus((4, 4, 4))
  shape = {"data": 8, "fsdp": 8, "tensor": 1}
  with pytest.raises(NotImplementedError):
    mesh_utils.create_device_mesh((8, 8, 1), chips)
  with caplog.at_level(logging.WARNING):
    grid = shd.device_grid(shape, chips)
  assert grid.shape == (8, 8, 1)
  assert sorted(d.id for d in grid.flat) == list(range(64))
  assert ("no layout of the mesh {'data': 8, 'fsdp': 8, 'tensor': 1} (per "
          "slice) on whole physical axes of these TPU v4 chips" in caplog.text)
  assert "If you want to split physical axes" in caplog.text   # jax's, whole
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    grid = shd.device_grid({"data": 4, "fsdp": 16, "tensor": 1}, chips)
  assert caplog.text == ""
  assert (grid == mesh_utils.create_device_mesh((4, 16, 1), chips)).all()


def test_one_slice_keeps_jax_make_mesh_and_refuses_a_dcn_split():
  cfg = base.get_config()
  cfg.mesh.shape = ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1))
  mesh = shd.create_mesh(cfg.mesh, jax.devices())
  assert (mesh.devices == jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
          .devices).all()
  cfg.mesh.dcn_shape = ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=1))
  with pytest.raises(ConfigError, match="needs 2 slices but 1 are available"):
    shd.create_mesh(cfg.mesh, jax.devices())
