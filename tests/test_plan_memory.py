"""bench/plan_memory.py: per-device state bytes follow the mesh; compiled step memory."""

import importlib.util
import os
import pathlib
import sys

import jax
import pytest

from configs import demo
from genvis_jax.train.tasks import get_task
from tests import pipeline_common as pc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _planner():
  spec = importlib.util.spec_from_file_location("plan_memory",
                                                ROOT / "bench" / "plan_memory.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


pm = _planner()


def _knobs(config, mesh: str, batch: int = 8, micro: int = 1):
  """``config`` with the planner's ``--mesh``, ``--batch`` and
  ``--micro_batches`` set (remat and dtype the config's)."""
  return pm.apply_overrides(config, mesh=pm.parse_mesh(mesh), batch=batch,
                            micro_batches=micro, remat=None, dtype=None)


def _tiny(mesh, **kw):
  """The demo RAR (4 blocks of width 128) with the planning knobs set."""
  return _knobs(demo.rar_config(), mesh, **kw)


def test_fsdp_divides_parameter_and_optimizer_bytes():
  devices = jax.devices()[:4]
  rep = pm.plan(_tiny("data=4"), devices=devices, compile_step=False)
  fsdp = pm.plan(_tiny("fsdp=4", micro=2), devices=devices, compile_step=False)
  assert (rep.micro_batches, fsdp.micro_batches) == (1, 2)   # --micro_batches
  assert "8 / 2" in pm.format_table([fsdp])
  assert rep.params == fsdp.params > 1_000_000
  # Replicated: every device holds all fp32 parameters and both Adam moments.
  assert rep.param_bytes == 4 * rep.params
  assert rep.opt_bytes >= 2 * rep.param_bytes
  ratio = rep.param_bytes / fsdp.param_bytes
  assert 3.5 < ratio <= 4.0, ratio     # only small norms / biases stay replicated
  assert 3.5 < rep.opt_bytes / fsdp.opt_bytes <= 4.0
  assert fsdp.state_bytes_total == rep.state_bytes_total


def test_compiled_step_memory_and_table():
  devices = jax.devices()[:4]
  p = pm.plan(_tiny("data=2,fsdp=2", batch=8, micro=1), name="demo_rar",
              devices=devices)
  c = p.compiled
  # Arguments = this device's state + its share of the batch + rng (small).
  assert p.state_bytes <= c["argument"] < p.state_bytes + 100_000
  assert c["alias"] > 0.9 * p.state_bytes      # the donated state is reused
  assert c["temp"] > 0 and p.peak_bytes > c["argument"]
  table = pm.format_table([p])
  assert "| demo_rar |" in table and "data=2,fsdp=2" in table and "8 / 1" in table


def test_an_equivariant_generator_is_planned_with_its_tokenizer_shapes(
    monkeypatch):
  """The Equivariant generator encodes its images with a frozen tokenizer:
  without a checkpoint the planner failed at the trainer's check (the
  state-bytes table's Equivariant rows could not be reproduced). It plans
  with the tokenizer's shapes, counted in the step's arguments, and compiles
  the step at the config's matmul precision (float32), as the run does (it
  compiled XLA's default, another program). The settings are those of the
  Equivariant pipeline's generator run (tests/test_pipeline_eq.py): the
  same program, which the persistent cache gives back when that test ran
  first."""
  config = pc.load_config("eq_s.py:runlocal", **pc.steps(4))
  assert not config.tokenizer.get("checkpoint")
  assert config.matmul_precision == "float32"
  precisions, placed_frozen = [], pm.frozen_lib.placed_frozen

  class Step:   # the step the planner lowers, seen lowering
    def __init__(self, step):
      self.step = step

    def lower(self, *args):
      precisions.append(jax.config.jax_default_matmul_precision)
      return self.step.lower(*args)

  def spied(*args):
    frozen, step = placed_frozen(*args)
    return frozen, Step(step)
  monkeypatch.setattr(pm.frozen_lib, "placed_frozen", spied)
  p = pm.plan(config, devices=jax.devices())
  assert precisions == ["float32"]
  assert jax.config.jax_default_matmul_precision is None   # put back
  shapes = pm.frozen_lib.tokenizer_shapes(config, get_task(config))["tokenizer"]
  size = lambda tree: sum(a.size * a.dtype.itemsize
                          for a in jax.tree_util.tree_leaves(tree))
  # The step reads the encoder's weights (the decoder's are pruned).
  encoder = size(shapes["encoder"]) + size(shapes["quant_layer"])
  assert p.params > 0
  assert (p.state_bytes + encoder <= p.compiled["argument"]
          < p.state_bytes + size(shapes) + 100_000)


def test_a_teacher_without_a_file_is_planned_by_its_shapes():
  """FQGAN's teacher counted only when its weights file was set: a plan
  without it left out its 1.13 GiB. It is planned by its shapes (no file
  read), split over fsdp as the trainer splits it; not where the model's
  head is narrower than the tower (a runlocal's), which could not run."""
  small = _knobs(pm.load_config("configs/fqgan_dual_ds16.py:runlocal"),
                 "data=2,fsdp=4")
  assert small.teachers[0].path == ""
  config = _knobs(pm.load_config("configs/fqgan_dual_ds16.py"),
                  "data=2,fsdp=4")
  assert config.teachers[0].path == pm.frozen_lib.PLANNED
  p = pm.plan(config, devices=jax.devices(), compile_step=False)
  # CLIP ViT-L/14: 303M fp32 parameters, a quarter each (norms, biases whole).
  assert 303e6 <= p.frozen_bytes < 303e6 * 1.01, p.frozen_bytes
  assert "| 0.283 |" in pm.format_table([p])


def test_bad_mesh_flag():
  with pytest.raises(ValueError, match="AXIS=SIZE"):
    pm.parse_mesh("data:2")
  with pytest.raises(ValueError, match=r"fsdp='x' is not a whole number"):
    pm.parse_mesh("fsdp=x")
  # data left out takes the devices the others leave, as the configs' -1.
  assert pm.parse_mesh("fsdp=8") == {"data": -1, "fsdp": 8, "tensor": 1}
  assert pm.parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "tensor": 1}
  # A demo of stages has no one model to plan: said, not a traceback.
  with pytest.raises(ValueError, match=r"configs/demo.py runs stages .*"
                                       r"plan a single-model config"):
    pm.load_config("configs/demo.py")


def test_a_config_that_cannot_run_is_reported_whole(capsys):
  """The planner cut each error at 120 characters, losing the fix ("Use a
  multiple of ..."), and printed it in a table row; bad flags were tracebacks
  or silently the config's values."""
  plans = pm.main(["--config=configs/rar_b.py:runlocal", "--mesh=data=3",
                   "--no_compile"])
  out = capsys.readouterr().out
  assert plans[0].error and "| rar_b.py:runlocal | error (below) |" in out
  assert out.rstrip().endswith(plans[0].error) and len(plans[0].error) > 120
  # --dcn sets config.mesh.dcn_shape: 2 slices asked of one.
  [p] = pm.main(["--config=configs/rar_b.py:runlocal", "--dcn=data=2",
                 "--no_compile"])
  assert "config.mesh.dcn_shape" in p.error and "needs 2 slices but 1 are available" in p.error
  for bad in (["--batch=0"], ["--devices=-4"], ["--mesh=dp=8"],
              ["--dcn=data:2"], ["--config=configs/nope.py"]):
    with pytest.raises(SystemExit):
      pm.main(bad)
  assert "give a positive number" in capsys.readouterr().err


def test_a_generators_training_grid_is_planned_with_the_weights_whole(
    monkeypatch):
  """``--grid``: the sample grid drawn every ``image_every`` steps holds the
  whole weights on every device beside the sharded train state (under fsdp
  it once held a gathered copy per decode loop); the planner prints it.
  Without ``--devices`` the planner takes its default 8 fake devices (it
  took the machine's one, and refused every 8-device mesh)."""
  p = pm.plan(_tiny("data=2,fsdp=4"), name="demo_rar", compile_step=False,
              grid=True)
  [grid] = p.grid
  assert grid["samples"] == 16 and grid["temp"] > 0
  # fp32 weights whole (the train state holds about a quarter of them).
  assert grid["argument"] >= 4 * p.params > 2 * p.param_bytes
  assert ("| demo_rar | samples | data=2,fsdp=4 | 16 |"
          in pm.format_grid_table([p]))
  monkeypatch.setenv("XLA_FLAGS",
                     "--xla_cpu_foo --xla_force_host_platform_device_count=2")
  pm._force_host_devices(["--config=configs/rar_b.py"])   # pylint: disable=protected-access
  assert os.environ["XLA_FLAGS"] == (
      "--xla_cpu_foo --xla_force_host_platform_device_count=8")
