"""Memory planner: parameters, sharded state bytes per device, compiled step memory.

For each config: parameter count, parameter / optimizer-state / EMA bytes per
device under the mesh (from ``genvis_jax.train.state.trace_init``), and the
compiled train step's ``memory_analysis()`` (arguments, outputs, temporaries,
generated code) for a given global batch, micro-batch count, remat and dtype.

  # 8 fake CPU devices (cheap, anywhere): a plan for the mesh you will use.
  python bench/plan_memory.py --config=configs/rar_b.py --devices=8 \
      --mesh=data=2,fsdp=4 --batch=16
  # On the target machine (TPU VM / GPU box) with its real devices:
  python bench/plan_memory.py --config=configs/rar_xl.py --devices=0 \
      --mesh=data=-1,fsdp=8 --batch=2048 --micro_batches=4

State bytes follow from the shardings alone and hold on any backend. Compiled
numbers come from XLA for the backend that compiled the step: CPU temporaries,
fusion and layout differ from TPU / GPU, so run the script on the target to
plan its memory (with ``--devices=0``). Frozen weights without a file set
are counted by their shapes (none is read): the teachers (LPIPS, 59 MB, is
then left out), the Equivariant generator's tokenizer; others only when
their paths are set. ``frozen GiB``: those weights on one device, placed as
the trainer places them (teachers and tokenizers split by the rules, as
trained weights are; LPIPS whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER_CONFIGS = (
    "configs/rar_b.py", "configs/rar_l.py", "configs/rar_xl.py",
    "configs/rar_xxl.py", "configs/maskgit_vqgan.py",
    "configs/far_b.py:dual", "configs/far_b.py:triple", "configs/far_l.py:dual",
    "configs/fqgan_dual_ds16.py", "configs/fqgan_triple_ds16.py",
    "configs/eq_s.py", "configs/eq_b.py", "configs/eq_l.py", "configs/eq_h.py",
    "configs/eq_tokenizer.py",
)


DEFAULT_DEVICES = 8


def _force_host_devices(argv) -> None:
  """``--devices=N`` (N > 0, default 8): N fake CPU devices; must run before
  jax is imported."""
  value = str(DEFAULT_DEVICES)
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      value = a.split("=", 1)[1]
    elif a == "--devices" and i + 1 < len(argv):
      value = argv[i + 1]
  if value.isdigit() and int(value) > 0:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={int(value)}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _force_host_devices(sys.argv[1:])
  sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import plan_frozen as frozen_lib  # noqa: E402


def load_config(spec: str):
  """``path/to/config.py[:arg]`` -> ``get_config(arg)`` (paths relative to the repo)."""
  path, _, arg = spec.partition(":")
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(full):
    raise FileNotFoundError(f"Config file {full} does not exist.")
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  name = "plan_cfg_" + os.path.basename(path)[:-3]
  module_spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  if "stages" in config:   # a demo: no one model, mesh or batch to plan
    raise ValueError(
        f"{spec} runs stages ({', '.join(config.stages)}), each its own "
        "config: plan a single-model config instead (e.g. configs/far_demo.py, "
        "configs/eq_demo.py), or the paper config a stage shrinks.")
  return config


def parse_mesh(text: str, flag: str = "--mesh") -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> {"data": 2, "fsdp": 4, "tensor": 1} (-1 = the
  rest). An axis left out is 1, except ``data``: the devices (``--dcn``:
  slices) the others leave (-1), as in ``configs/base.py``, unless another
  axis is -1."""
  shape = {"data": None, "fsdp": 1, "tensor": 1}
  for part in filter(None, text.split(",")):
    key, sep, value = part.partition("=")
    if not sep or key.strip() not in shape:
      raise ValueError(f"{flag}={text!r}: expected comma-separated AXIS=SIZE with "
                       f"AXIS in {sorted(shape)}, e.g. data=2,fsdp=4.")
    try:
      shape[key.strip()] = int(value)
    except ValueError:
      raise ValueError(f"{flag}={text!r}: {key.strip()}={value!r} is not a "
                       "whole number (-1: the rest).") from None
  if shape["data"] is None:
    shape["data"] = 1 if -1 in shape.values() else -1
  return shape


def apply_overrides(config, *, mesh: dict, batch: int | None,
                    micro_batches: int | None, remat: str | None,
                    dtype: str | None, dcn: dict | None = None):
  """Returns a copy of ``config`` with the planning knobs set."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for k, v in mesh.items():
      config.mesh.shape[k] = v
    for k, v in (dcn or {}).items():
      config.mesh.dcn_shape[k] = v
    if batch:
      config.train.global_batch_size = batch
    if micro_batches:
      config.train.micro_batches = micro_batches
    if remat:
      config.model.remat = remat
    if dtype:
      config.model.dtype = dtype
    # Sample grids are not part of the planned step (and would load the
    # tokenizer they decode with).
    config.train.image_every = 0
    # Teachers without a file: by their shapes, where the model takes them.
    frozen_lib.plan_teachers_by_shapes(config)
  return config


def sharded_bytes(abstract, shardings) -> int:
  """Bytes one device holds of ``abstract`` laid out as ``shardings`` (even splits)."""
  total = 0
  for a, s in zip(jax.tree_util.tree_leaves(abstract),
                  jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(s.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
  return total


def total_bytes(abstract) -> int:
  return sum(int(a.size) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree_util.tree_leaves(abstract))


def batch_spec(config, task, batch: int, sharding) -> dict:
  """Abstract training batch of ``config.task`` (what the Grain pipeline yields)."""
  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  spec = {"label": sds((batch,), jnp.int32)}
  model = getattr(task, "model", None)
  if config.data.source == "tokens":
    k = getattr(model, "num_codebooks", None)
    n = model.seq_len
    spec["tokens"] = sds((batch, k, n) if k else (batch, n), jnp.int32)
    return spec
  # Images, also for the Equivariant generator: its step encodes them with
  # the frozen tokenizer (whose activations count).
  h = config.data.image_size
  w = config.data.get("image_width", 0) or h
  spec["image"] = sds((batch, h, w, 3), jnp.float32)
  return spec


@dataclasses.dataclass
class Plan:
  """One row of the table (bytes are per device)."""
  config: str
  mesh: dict
  batch: int
  micro_batches: int
  remat: str
  remat_honored: bool
  dtype: str
  params: int
  param_bytes: int
  opt_bytes: int
  ema_bytes: int
  state_bytes_total: int       # unsharded params + opt + ema, all devices together
  frozen_bytes: int = 0         # frozen weights (teachers, a tokenizer) as placed
  compiled: dict | None = None  # argument / output / alias / temp / code bytes
  grid: list | None = None      # each training sample grid's program, the same
  error: str = ""

  @property
  def state_bytes(self) -> int:
    return self.param_bytes + self.opt_bytes + self.ema_bytes

  @property
  def peak_bytes(self) -> int | None:
    """Arguments + outputs - donated aliases + temporaries (+ code)."""
    c = self.compiled
    if not c:
      return None
    return (c["argument"] + c["output"] - c["alias"] + c["temp"]
            + c["generated_code"])


def plan(config, *, name: str = "", devices=None, compile_step: bool = True,
         grid: bool = False) -> Plan:
  """Plans ``config`` (mesh / batch / knobs already set) on ``devices``;
  with ``grid``, a generator's training sample grid too."""
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  task = tasks_lib.get_task(config)
  frozen = frozen_lib.frozen_shapes(config, task)
  mesh, task = trainer_lib.setup(config, mesh=shd.create_mesh(config.mesh,
                                                              devices),
                                 task=task)
  tr = trainer_lib.Trainer(config, mesh=mesh, task=task)
  st, sh = tr.abstract, tr.shardings
  params = sum(int(a.size) for a in jax.tree_util.tree_leaves(st.params))
  model = getattr(tr.task, "model", None)
  p = Plan(
      config=name, mesh=dict(mesh.shape), batch=config.train.global_batch_size,
      micro_batches=config.train.micro_batches, remat=config.model.remat,
      remat_honored=hasattr(model, "remat"), dtype=config.model.dtype,
      params=params, param_bytes=sharded_bytes(st.params, sh.params),
      opt_bytes=sharded_bytes(st.opt_state, sh.opt_state),
      ema_bytes=sharded_bytes(st.ema, sh.ema) if st.ema is not None else 0,
      state_bytes_total=total_bytes(st),
      frozen_bytes=sharded_bytes(*_abstract_and_shardings(
          frozen_lib.placed_frozen(tr, frozen)[0])))
  # Both compile under tr.context(): at the config's matmul precision, as
  # the run's train loop does (the Equivariant configs' float32: HIGHEST
  # fp32 dots and convolutions, 6 bf16 passes on a TPU against one).
  if compile_step:
    p.compiled = compiled_memory(tr, config, frozen)
  if grid:
    p.grid = grid_memory(tr, config)
  return p


def _abstract_and_shardings(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return leaves, [a.sharding for a in leaves]


def compiled_memory(tr, config, frozen=None) -> dict:
  """Lowers and compiles the donated train step with abstract arguments
  (``frozen``: boxed abstract frozen weights in place of ``tr.frozen``)."""
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  batch = batch_spec(config, tr.task, config.train.global_batch_size,
                     shd.batch_sharding(tr.mesh, tr.rules))
  rng = jax.ShapeDtypeStruct(tr.train_rng.shape, tr.train_rng.dtype,
                             sharding=shd.replicated(tr.mesh))
  frozen, step = frozen_lib.placed_frozen(tr, frozen)
  with tr.context():
    compiled = step.lower(tr.abstract_state(), batch, rng, frozen).compile()
  m = compiled.memory_analysis()
  return {"argument": int(m.argument_size_in_bytes),
          "output": int(m.output_size_in_bytes),
          "alias": int(m.alias_size_in_bytes),
          "temp": int(m.temp_size_in_bytes),
          "generated_code": int(m.generated_code_size_in_bytes)}


def grid_memory(tr, config) -> list[dict] | None:
  """The memory of each of a generator's training sample grids
  (``grid_configs``: ``config.sample``, and the Equivariant generator's
  wide grid at ``sample.wide_columns``), ``grid_size`` classes each (not
  the tokenizer's decode, a program of its own), compiled on the trainer's
  mesh as ``GeneratorTask.draw`` traces it, with its inputs placed as
  ``generator.placed_as_sampling`` places them: the weights whole on every
  device, the classes split over the batch axes. None for tasks without
  grids. Traced with the classes unknown, the sampler sizes its modulation
  tables for all of them on each device (an upper bound)."""
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  from genvis_jax.train.tasks import generator  # pylint: disable=import-outside-toplevel
  task = tr.task
  if not isinstance(task, generator.GeneratorTask):
    return None
  rows, sharding = generator.grid_placement(task.grid_size, tr.mesh, tr.rules)
  labels = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding)
  weights = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=shd.replicated(tr.mesh)),
      tr.abstract.params["model"])
  rng = jax.ShapeDtypeStruct(tr.visual_rng.shape, tr.visual_rng.dtype,
                             sharding=shd.replicated(tr.mesh))
  batch = batch_spec(config, task, config.train.global_batch_size,
                     shd.batch_sharding(tr.mesh, tr.rules))
  out = []
  for name, sample_config in task.grid_configs(batch):
    draw = jax.jit(lambda w, l, r, s=sample_config: task.draw(w, l, r, s))
    with tr.context():
      m = draw.lower(weights, labels, rng).compile().memory_analysis()
    out.append({"name": name, "samples": task.grid_size,
                "argument": int(m.argument_size_in_bytes),
                "output": int(m.output_size_in_bytes),
                "temp": int(m.temp_size_in_bytes)})
  return out


def _gib(n) -> str:
  return "-" if n is None else f"{n / 2**30:.3f}"


def format_table(plans) -> str:
  """Markdown table; sizes in GiB per device."""
  head = ("| config | params (M) | mesh | batch / micro | remat | dtype | param GiB | "
          "opt GiB | ema GiB | state GiB | frozen GiB | args GiB | out GiB | "
          "temp GiB | "
          "code GiB | peak GiB |")
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  for p in plans:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "1 device"
    if p.error:   # the whole message (its fix) is printed below the table
      rows.append(f"| {p.config} | error (below) |" + " |" * 14)
      continue
    c = p.compiled or {}
    remat = p.remat if p.remat_honored else f"{p.remat} (ignored)"
    rows.append(
        f"| {p.config} | {p.params / 1e6:.1f} | {mesh} | {p.batch} / "
        f"{p.micro_batches} | {remat} | {p.dtype} | {_gib(p.param_bytes)} | "
        f"{_gib(p.opt_bytes)} | {_gib(p.ema_bytes)} | {_gib(p.state_bytes)} | "
        f"{_gib(p.frozen_bytes)} | {_gib(c.get('argument'))} | "
        f"{_gib(c.get('output'))} | "
        f"{_gib(c.get('temp'))} | {_gib(c.get('generated_code'))} | "
        f"{_gib(p.peak_bytes)} |")
  return "\n".join(rows)


def format_grid_table(plans) -> str:
  """Markdown table of the plans' grid programs; GiB per device. ``with
  state``: the train state plus the grid's arguments and temporaries, what
  the devices hold while a grid is drawn."""
  rows = ["| config | grid | mesh | samples | args GiB | temp GiB | "
          "with state GiB |", "|---|---|---|---|---|---|---|"]
  for p in plans:
    for g in p.grid or ():
      mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1)
      rows.append(f"| {p.config} | {g['name']} | {mesh or '1 device'} | "
                  f"{g['samples']} | {_gib(g['argument'])} | "
                  f"{_gib(g['temp'])} | "
                  f"{_gib(p.state_bytes + g['argument'] + g['temp'])} |")
  return "\n".join(rows)


def _error_plan(name, config, err) -> Plan:
  return Plan(config=name, mesh=dict(config.mesh.shape),
              batch=config.train.global_batch_size,
              micro_batches=config.train.micro_batches, remat=config.model.remat,
              remat_honored=False, dtype=config.model.dtype, params=0,
              param_bytes=0, opt_bytes=0, ema_bytes=0, state_bytes_total=0,
              error=f"{type(err).__name__}: {' '.join(str(err).split())}")


def main(argv=None) -> list[Plan]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", action="append", default=None,
                  help="configs/X.py[:arg]; repeat for several; 'paper' = "
                  + ", ".join(PAPER_CONFIGS))
  ap.add_argument("--devices", type=int, default=DEFAULT_DEVICES,
                  help="N > 0: N fake CPU devices; 0: this machine's devices")
  ap.add_argument("--mesh", default="data=-1",
                  help="e.g. data=2,fsdp=4 (data left out: the devices the "
                       "others leave)")
  ap.add_argument("--dcn", default="",
                  help="multislice (--devices=0 on TPU slices): how many "
                  "slices each axis spans, e.g. data=2 (config.mesh.dcn_shape; "
                  "default: every slice on data)")
  ap.add_argument("--batch", type=int, default=None,
                  help="global batch per step (default: the config's)")
  ap.add_argument("--micro_batches", type=int, default=None)
  ap.add_argument("--remat", default=None, help="none | full | dots | dots_no_batch")
  ap.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16")
  ap.add_argument("--no_compile", action="store_true",
                  help="state bytes only (no step compile)")
  ap.add_argument("--grid", action="store_true",
                  help="also compile a generator's training sample grid "
                  "(config.train.image_every) and print its memory")
  args = ap.parse_args(argv)
  specs = args.config or ["configs/rar_b.py"]
  specs = [s for spec in specs
           for s in (PAPER_CONFIGS if spec == "paper" else [spec])]
  for flag, value in (("--devices", args.devices), ("--batch", args.batch),
                      ("--micro_batches", args.micro_batches)):
    if value is not None and value < (0 if flag == "--devices" else 1):
      ap.error(f"{flag}={value}: give a positive number"
               + (" (0: this machine's devices)" if flag == "--devices" else
                  " (leave it out for the config's)"))
  try:
    mesh = parse_mesh(args.mesh)
    dcn = parse_mesh(args.dcn, "--dcn") if args.dcn else None
    configs = [(spec, load_config(spec)) for spec in specs]
  except (ValueError, FileNotFoundError) as e:
    ap.error(str(e))
  plans = []
  for spec, loaded in configs:
    config = apply_overrides(loaded, mesh=mesh, dcn=dcn, batch=args.batch,
                             micro_batches=args.micro_batches, remat=args.remat,
                             dtype=args.dtype)
    name = spec.replace("configs/", "")
    try:
      plans.append(plan(config, name=name, compile_step=not args.no_compile,
                        grid=args.grid))
    except Exception as e:  # pylint: disable=broad-except
      plans.append(_error_plan(name, config, e))
    print(f"[plan_memory] {name}: done", file=sys.stderr, flush=True)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"({jax.devices()[0].device_kind}); GiB per device\n")
  print(format_table(plans))
  if args.grid:
    print("\nTraining sample grids (config.sample, drawn every "
          "config.train.image_every steps beside the train state):\n")
    print(format_grid_table(plans))
  for p in plans:
    if p.error:
      print(f"\n{p.config}: {p.error}")
  return plans


if __name__ == "__main__":
  sys.exit(1 if any(p.error for p in main()) else 0)
