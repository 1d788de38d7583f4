"""Sharded training on 8 fake CPU devices: data x fsdp == 1 device; fsdp really
splits parameters; k micro-batches == one full batch."""

import re

import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from genvis_jax.core import mesh_checks
from genvis_jax.core import sharding as shd
from genvis_jax.errors import ConfigError
from genvis_jax.train import trainer as trainer_lib


def _config(mesh_shape, micro_batches=1, opt="adamw"):
  c = base.get_config()
  c.task = "classifier"
  c.model = ml_collections.ConfigDict(dict(
      name="classifier", num_classes=10, widths=(16, 32, 64), image_size=16,
      dtype="float32", param_dtype="float32", remat="none"))
  c.data.image_size = 16
  c.mesh.shape = ml_collections.ConfigDict(mesh_shape)
  c.train.global_batch_size = 16
  c.train.micro_batches = micro_batches
  c.train.num_steps = 10
  c.train.ema_decay = 0.9
  c.optimizer.name = opt
  c.optimizer.lr = 1e-2
  c.optimizer.weight_decay = 1e-4 if opt == "adamw" else 0.0   # sgd reads none
  return c


def _batch(seed=0, n=16):
  r = np.random.RandomState(seed)
  return {"image": r.rand(n, 16, 16, 3).astype(np.float32),
          "label": r.randint(0, 10, size=(n,)).astype(np.int32)}


def _run(config, devices, steps=2):
  mesh = shd.create_mesh(config.mesh, devices)
  tr = trainer_lib.Trainer(config, mesh=mesh)
  state = tr.init_state()
  losses = []
  for i in range(steps):
    state, m = tr.step(state, _batch(i))
    losses.append(float(m["loss"]))
  return tr, state, losses


def _assert_trees_close(a, b, tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol,
                               err_msg=jax.tree_util.keystr(path))


def test_data_fsdp_mesh_matches_single_device():
  one = _config(dict(data=1, fsdp=1, tensor=1))
  tr1, s1, l1 = _run(one, jax.devices()[:1])
  eight = _config(dict(data=2, fsdp=4, tensor=1))
  tr8, s8, l8 = _run(eight, jax.devices())
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  _assert_trees_close(s1.params, s8.params, 1e-5)
  _assert_trees_close(s1.ema, s8.ema, 1e-5)
  # The step's FLOPs (the log's TFLOP/s) are per device: an eighth on 8.
  assert tr1.step_flops > 0
  assert tr8.step_flops == pytest.approx(tr1.step_flops / 8, rel=1e-3)


def test_fsdp_splits_large_parameters():
  cfg = _config(dict(data=2, fsdp=4, tensor=1))
  tr, state, _ = _run(cfg, jax.devices(), steps=1)
  kernel = state.params["model"]["conv_2"]["kernel"]          # (3, 3, 32, 64)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(3, 3, 32, 16)}
  # Adam moments follow their parameter.
  mu = state.opt_state["model"][1][0].mu["conv_2"]["kernel"]
  assert mu.sharding.spec == kernel.sharding.spec
  # A dimension the axis does not divide stays replicated instead of failing.
  head_b = state.params["model"]["head"]["bias"]               # (10,)
  assert head_b.sharding.is_fully_replicated


def test_micro_batches_match_full_batch():
  full = _config(dict(data=2, fsdp=4, tensor=1), micro_batches=1, opt="sgd")
  tr_full, s_full, l_full = _run(full, jax.devices(), steps=2)
  micro = _config(dict(data=2, fsdp=4, tensor=1), micro_batches=2, opt="sgd")
  tr_micro, s_micro, l_micro = _run(micro, jax.devices(), steps=2)
  np.testing.assert_allclose(l_full, l_micro, rtol=1e-5)
  _assert_trees_close(s_full.params, s_micro.params, 1e-5)
  # XLA counts the micro-batch loop's body once: the step's FLOPs take it
  # twice, as many as the whole batch's (the update counted twice beside).
  assert tr_micro.step_flops == pytest.approx(tr_full.step_flops, rel=0.02)


def test_batch_not_divisible_is_rejected_before_compiling():
  cfg = _config(dict(data=2, fsdp=4, tensor=1))
  cfg.train.global_batch_size = 12
  with pytest.raises(ValueError, match="does not divide across 8"):
    trainer_lib.Trainer(cfg, mesh=shd.create_mesh(cfg.mesh, jax.devices()))
  # Nor into micro-batches: 16 rows over 8 devices, 2 each, not 3 slices.
  with pytest.raises(ConfigError, match=r"x 3 micro-batches"):
    trainer_lib.setup(_config(dict(data=8), micro_batches=3))


def test_batch_split_follows_the_rules_table():
  """Input batches, the divisibility check and the micro-batch split use the
  rules' "batch" entry, the one the activation constraints use."""
  from configs import base
  cfg = _config(dict(data=2, fsdp=4, tensor=1))
  mesh = shd.create_mesh(cfg.mesh, jax.devices())
  assert shd.batch_axes(mesh, cfg.sharding.rules) == ("data", "fsdp")
  cfg.sharding.rules = tuple((k, ("data",) if k == "batch" else v)
                             for k, v in base.DEFAULT_RULES)
  cfg.train.global_batch_size = 2     # 2 data shards; 8 with the default
  trainer_lib.setup(cfg, mesh=mesh)
  sharding = shd.batch_sharding(mesh, cfg.sharding.rules)
  assert sharding.spec == jax.sharding.PartitionSpec(("data",))
  assert shd.num_batch_shards(mesh, cfg.sharding.rules) == 2
  # Without the entry Flax replicated the batch's activations while the
  # inputs were split over BATCH_AXES; None (the whole batch everywhere) is
  # said explicitly.
  cfg.sharding.rules = tuple((k, v) for k, v in base.DEFAULT_RULES
                             if k != "batch")
  with pytest.raises(ConfigError, match=r'config.sharding.rules has no '
                     r'"batch" entry.*\("batch", None\)'):
    trainer_lib.setup(cfg, mesh=mesh)
  assert shd.batch_axes(mesh, (("batch", None),) + cfg.sharding.rules) == ()


def test_one_rules_table_in_the_package():
  """configs/base.py takes its rules from core.sharding, and the fallbacks
  without a table (BATCH_AXES, batch_axes(mesh)) read that same table."""
  assert base.DEFAULT_RULES is shd.DEFAULT_RULES
  assert shd.rules_tuple(base.get_config().sharding.rules) == shd.DEFAULT_RULES
  assert shd.BATCH_AXES == dict(shd.DEFAULT_RULES)["batch"]
  mesh = shd.create_mesh(_config(dict(data=2, fsdp=4, tensor=1)).mesh,
                         jax.devices())
  assert shd.batch_axes(mesh) == shd.batch_axes(mesh, shd.DEFAULT_RULES)


def test_processes_holding_the_same_rows_form_one_data_group():
  """Which rows of a 16-row batch each process feeds (tests/test_multihost.py
  runs two real processes): its own on a data-parallel mesh (contiguous or
  interleaved), all of them where a tensor axis spans both; overlapping but
  different rows are refused by name."""
  mesh = shd.create_mesh(_config(dict(data=8, fsdp=1, tensor=1)).mesh,
                         jax.devices())
  own = {0: {(0, 4), (4, 8)}, 1: {(8, 12), (12, 16)}}
  interleaved = {0: {(0, 4), (8, 12)}, 1: {(4, 8), (12, 16)}}
  shared = {0: {(0, 8), (8, 16)}, 1: {(0, 8), (8, 16)}}
  for rows, want in ((own, [(0, 2), (1, 2)]), (interleaved, [(0, 2), (1, 2)]),
                     (shared, [(0, 1), (0, 1)])):
    assert [shd._group_of(rows, 16, p, mesh, None) for p in (0, 1)] == want
  for rows in ({0: {(0, 8)}, 1: {(4, 12)}},            # overlapping
               {0: {(0, 4)}, 1: {(4, 16)}}):           # groups of two sizes
    with pytest.raises(ValueError, match=r"processes hold overlapping but "
                       r"different rows of it \(rows by process: \{0: "):
      shd._group_of(rows, 16, 0, mesh, None)
  assert shd.data_groups(mesh, 16) == (0, 1)          # one process here


def test_a_data_group_whose_processes_read_apart_stops(monkeypatch):
  """Three processes, 0 and 1 one data group: their running CRCs of what they
  fed must agree at check steps (a process that skipped a record its
  group-mate read feeds other examples from then on)."""
  from genvis_jax.core import multihost  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import replicas  # pylint: disable=import-outside-toplevel
  assert not replicas.GroupCheck((0, 1)).shared    # one process, one group
  monkeypatch.setattr(replicas.jax, "process_count", lambda: 3)
  answers = [np.array([0, 0, 1])]
  monkeypatch.setattr(multihost, "gather_ints", lambda v: answers.pop(0))
  check, same, other = (replicas.GroupCheck((0, 2)), replicas.GroupCheck.__new__(
      replicas.GroupCheck), replicas.GroupCheck.__new__(replicas.GroupCheck))
  for c in (same, other):
    c.shared, c._crc, c._groups = True, 0, None
  batches = [{"image": np.random.default_rng(i).random((4, 8, 8, 3)),
              "label": np.arange(4) + i} for i in range(3)]
  for c, fed in ((check, batches[:2]), (same, batches[:2]),
                 (other, batches[1:])):
    for b in fed:
      c.update(b)
  assert check._crc == same._crc != other._crc
  answers[:] = [np.array([check._crc, same._crc, 12345])]
  check.check(8)                                   # group 1 is one process
  answers[:] = [np.array([check._crc, other._crc & 0x7FFFFFFF, 12345])]
  with pytest.raises(replicas.DataGroupMismatchError,
                     match=r"Processes \[0, 1\] feed the same rows of the "
                           r"batch \(data group 0\), but read different "
                           r"examples by step 8"):
    check.check(8)


def test_mesh_shape_errors():
  with pytest.raises(ConfigError, match=r"config.mesh.shape .*at most one "
                     r"axis may be -1"):
    shd.mesh_shape(ml_collections.ConfigDict(
        dict(shape=dict(data=-1, fsdp=-1))), 8)
  with pytest.raises(ValueError, match="needs 6 devices"):
    shd.mesh_shape(ml_collections.ConfigDict(dict(shape=dict(data=2, fsdp=3))), 8)
  assert shd.mesh_shape(ml_collections.ConfigDict(
      dict(shape=dict(data=-1, fsdp=2, tensor=1))), 8) == dict(data=4, fsdp=2, tensor=1)


@pytest.mark.parametrize("shape", [
    dict(data=-1, fsdp=-1, tensor=1), dict(data=0, fsdp=-1, tensor=1),
    dict(data=-2, fsdp=1, tensor=1), dict(data="4", fsdp=2, tensor=1),
    dict(data=3, fsdp=2, tensor=1)])
def test_bad_mesh_shape_in_a_config_is_a_config_error(shape):
  """Building the run's mesh (the trainer's first step, before any model is
  traced) names config.mesh.shape; ConfigError is also a ValueError."""
  cfg = _config(shape)
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape") as e:
    shd.create_mesh(cfg.mesh, jax.devices())
  assert isinstance(e.value, ValueError)


def test_a_mesh_axis_the_rules_do_not_use_is_refused():
  """A config's ``model`` axis (t5x / MaxText's name for 'tensor') built a
  mesh on which every parameter and Adam moment stayed whole and those
  devices repeated the same work, without a word; so did a rule naming a
  misspelt axis (RAR-XL's state 10.68 GiB per device instead of 2.68)."""
  with pytest.raises(ConfigError, match=r"config.mesh.shape names axis "
                     r"'model' \(size 4\), which no rule .*'tensor'"):
    trainer_lib.setup(_config(dict(data=2, model=4)))
  with pytest.raises(ConfigError, match=r"names axis 'model' \(size 2\)"):
    trainer_lib.setup(_config(dict(data=4, model=2)))    # the smallest split
  cfg = _config(dict(data=2, fsdp=4, tensor=1))
  cfg.sharding.rules = [(n, "model" if n == "embed" else a)
                        for n, a in shd.DEFAULT_RULES]
  with pytest.raises(ConfigError, match=r"config.sharding.rules splits over "
                     r"axis 'model', which config.mesh.shape .* does not"):
    trainer_lib.setup(cfg)
  # A rule may name the axis while the model hardly has its dimensions: a
  # CNN tokenizer on tensor=4 split only its codebook (0.3% of the bytes),
  # its 4 devices repeating the same work, with no word.
  from flax import linen as nn
  boxed = lambda shape, names: nn.LogicallyPartitioned(
      jax.ShapeDtypeStruct(shape, np.float32), names)
  cnn = {"conv": boxed((3, 3, 512, 512), (None, None, "conv_in", "conv_out")),
         "codebook": boxed((1024, 8), ("vocab", "codebook_dim"))}
  rules = shd.DEFAULT_RULES
  mesh = jax.sharding.AbstractMesh((2, 1, 4), ("data", "fsdp", "tensor"))
  with pytest.raises(ConfigError, match=r"config.mesh.shape.tensor=4 splits "
                     r"0.3% of this model's parameter bytes and not the "
                     r"batch.*--config.mesh.shape.tensor=1"):
    mesh_checks.check_axes_split(cnn, mesh, rules)
  cnn["mlp"] = boxed((512, 2048), ("embed", "mlp"))
  mesh_checks.check_axes_split(cnn, mesh, rules)      # a transformer's share: fine
  mesh_checks.check_axes_split({"conv": cnn["conv"]}, jax.sharding.AbstractMesh(
      (2, 4, 1), ("data", "fsdp", "tensor")), rules)   # fsdp splits the batch
  # A default axis the mesh leaves out only turns its split off; size 1 too.
  trainer_lib.setup(_config(dict(data=-1)))
  trainer_lib.setup(_config(dict(data=-1, fsdp=1, tensor=1, model=1)))


def test_data_mesh_spans_exactly_the_given_devices():
  devices = jax.devices()[::-1][:4]
  mesh = shd.data_mesh(devices)
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 4
  assert set(mesh.devices.flat) == set(devices)   # make_mesh may reorder (TPU)
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def test_fused_qkv_splits_by_heads_under_tensor_parallelism():
  """A fused qkv kernel (d, 3d) split over ``tensor`` as stored would cut
  across q | k | v: every layer would reshuffle q, k, v between devices
  (collective-permutes forward, all-to-alls backward). Sliced by heads it
  exchanges only what separate q/k/v projections do (fsdp gathers, the
  output projection's all-reduce), and computes the same as x @ W + b."""
  import re
  import flax.linen as nn
  import jax.numpy as jnp
  from genvis_jax.models.layers.attention import Attention, FusedQKV
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x = jax.random.normal(jax.random.key(1), (8, 16, 64))
  rules = base.DEFAULT_RULES
  ops = {}
  for fused in (True, False):
    m = Attention(num_heads=8, mask="causal", fused_qkv=fused)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      abstract = jax.eval_shape(lambda: m.init(jax.random.key(0), x))
      shardings = nn.logical_to_mesh_sharding(
          nn.get_partition_spec(abstract), mesh, rules)
      params = jax.jit(lambda: m.init(jax.random.key(0), x),
                       out_shardings=shardings)()
      xs = jax.device_put(x, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
      loss = lambda p, x: m.apply(p, x).sum()
      hlo = "".join(jax.jit(f).lower(params, xs).compile().as_text()
                    for f in (loss, jax.grad(loss)))
    ops[fused] = sorted(set(re.findall(
        r"\b(all-to-all|collective-permute|all-gather|all-reduce|"
        r"reduce-scatter)(?:-start)?\(", hlo)))
    if fused:
      p = nn.unbox(jax.device_get(params))["params"]
      k = p["qkv"]["kernel"]
      p = {**p, "qkv": {"kernel": k, "bias": np.linspace(-1, 1, 192, dtype=np.float32)}}
      assert k.shape == (64, 192) and p["qkv"]["bias"].shape == (192,)
      # The stored layout: q | k | v, heads inside each third (timm).
      q_ref = (x @ k + p["qkv"]["bias"])[..., :64].reshape(8, 16, 8, 8)
      q, _, v = FusedQKV(8, 64, True, m.kernel_init, jnp.float32,
                         jnp.float32).apply({"params": p["qkv"]}, x)
      np.testing.assert_allclose(q, q_ref, rtol=1e-5, atol=1e-5)
      v_ref = (x @ k + p["qkv"]["bias"])[..., 128:].reshape(8, 16, 8, 8)
      np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5)
  assert ops[True] == ops[False] == ["all-gather", "all-reduce"], ops


def test_an_axis_that_divides_too_few_widths_is_told():
  """``fit_spec`` leaves a dimension the axis does not divide whole: with
  fsdp=12 and widths of 1408 every kernel stayed whole on every device, with
  no word. The note names the axis, the bytes, a parameter and sizes that
  divide; an axis splitting most bytes (a 3-channel conv aside) is quiet."""
  from flax import linen as nn
  mesh = jax.sharding.AbstractMesh((2, 12, 1), ("data", "fsdp", "tensor"))

  def boxed(*shapes):
    return {"model": {f"layer_{i}": {"kernel": nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(s, np.float32), n)} for i, (s, n) in
        enumerate(shapes)}}
  rules = shd.DEFAULT_RULES
  tree = boxed(((1408, 4224), ("embed", "mlp")), ((1408,), ("norm",)))
  note = mesh_checks.unsplit_note(tree, mesh, rules)
  assert re.fullmatch(
      r"config.mesh.shape.fsdp=12 divides too few parameter dimensions: 0.02 "
      r"of the 0.02 GiB .*'fsdp' stay whole on every device.*\(e.g. "
      r"model/layer_0/kernel \(1408, 4224\), dimension 1408\)\. Sizes up to "
      r"the 24 devices that divide most of them: \[2, 4, 8, 11, 16, 22\]\.",
      note), note
  # The sizes dividing 95% of the bytes, not a gcd over the largest leaves:
  # RAR-XL's 2026-row token table (0.3% of the bytes over 'tensor') made
  # that [2] where 4, 5, 8 and 10 split 99.6%.
  mesh_t = jax.sharding.AbstractMesh((4, 1, 3), ("data", "fsdp", "tensor"))
  small = [((128, 320), ("embed", "mlp"))] * 10     # each under the table
  note = mesh_checks.unsplit_note(boxed(((1280, 5120), ("embed", "mlp")),
                                ((2026, 64), ("vocab", "embed")), *small),
                          mesh_t, rules)
  assert note.endswith("that divide most of them: [2, 4, 5, 8, 10]."), note
  # Split: 1536 = 12 x 128; the output conv's 3 channels stay whole, quietly.
  assert mesh_checks.unsplit_note(boxed(((1536, 4224), ("embed", "mlp")),
                                ((3, 3, 1536, 3), (None, None, "conv_in",
                                                    "conv_out"))),
                          mesh, rules) == ""


def test_conv_feature_maps_stay_split_over_the_batch():
  """The conv kernels' output channels are split over fsdp; without a
  constraint on the feature maps GSPMD split some by channel instead and
  gathered the whole global batch onto every device (the tokenizers' steps
  at data=2, fsdp=4: twice data=8's temporaries)."""
  from flax import linen as nn
  from configs import maskgit_vqgan
  from genvis_jax import models
  config = maskgit_vqgan.get_config("runlocal")
  mesh = shd.create_mesh(ml_collections.ConfigDict(
      {"shape": dict(data=2, fsdp=4, tensor=1)}), jax.devices()[:8])
  model = models.build(config.model)
  size = config.data.image_size
  x = jax.ShapeDtypeStruct((16, size, size, 3), np.float32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)
  rules = shd.DEFAULT_RULES
  params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(boxed), shd.tree_shardings(boxed, mesh, rules))
  x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.batch_sharding(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    hlo = jax.jit(model.apply).lower(params, x).compile().as_text()
  assert "all-gather" in hlo   # the kernels are gathered (FSDP) ...
  # ... never a feature map of the global batch.
  assert not re.findall(r"= \w+\[16,\d+,\d+,\d+\]\S* all-gather\(", hlo)


@pytest.mark.parametrize("spec", ["rar_b:runlocal", "far_b:dual,runlocal"])
def test_embedding_lookups_do_not_gather_the_global_batch(spec):
  """The token, class and position tables are split over fsdp on the embed
  axis: a lookup from the split table made GSPMD gather the whole global
  batch's (B, L, d) cotangent onto every device for the backward's scatter
  ("Involuntary full rematerialization"; bytes that grow with the global
  batch). The tables are read whole (layers.whole): nothing of the global
  batch is gathered, the table gradients are summed over the devices."""
  import importlib
  from bench import plan_memory as pm
  name, arg = spec.split(":")
  config = importlib.import_module("configs." + name).get_config(arg)
  config.mesh.shape = ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1))
  config.train.global_batch_size = 16
  tr = trainer_lib.Trainer(config, mesh=shd.create_mesh(config.mesh,
                                                        jax.devices()[:8]))
  batch = pm.batch_spec(config, tr.task, 16, shd.batch_sharding(tr.mesh,
                                                                tr.rules))
  with tr.context():
    hlo = tr._step.lower(  # pylint: disable=protected-access
        tr.abstract_state(), batch, tr.train_rng, tr.frozen).compile().as_text()
  gathers = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather\(", hlo)
  assert gathers    # the split parameters are gathered (FSDP) ...
  # ... never an activation of the global batch.
  assert not [g for g in gathers if g.startswith("16,")], gathers


def test_frozen_weights_split_where_the_task_names_their_axes():
  """``state.frozen_shardings``: a frozen group's leaves the task names
  (``Task.frozen_axes``) split by the rules as trained weights are, matched
  by path; a key the module lacks (a weights file's extra leaf) and a group
  it does not name stay whole on every device."""
  import flax.linen as nn   # pylint: disable=import-outside-toplevel
  from genvis_jax.train import state as state_lib   # pylint: disable=import-outside-toplevel
  mesh = shd.create_mesh(ml_collections.ConfigDict(
      {"shape": dict(data=2, fsdp=4, tensor=1)}))
  frozen = {"teachers": {"sem": {"fc": {"kernel": np.ones((8, 6), np.float32)},
                                 "extra": np.ones((8, 6), np.float32)}},
            "lpips": {"lin": np.ones((8, 6), np.float32)}}
  axes = {"teachers": {"sem": {"fc": {"kernel": nn.LogicallyPartitioned(
      jax.ShapeDtypeStruct((8, 6), np.float32), ("embed", "mlp"))}}}}
  shardings = state_lib.frozen_shardings(frozen, axes, mesh,
                                         shd.DEFAULT_RULES)
  placed = shd.put_host(frozen, shardings)
  kernel = placed["teachers"]["sem"]["fc"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (2, 6)
  np.testing.assert_array_equal(np.asarray(kernel),
                                frozen["teachers"]["sem"]["fc"]["kernel"])
  for whole in (placed["teachers"]["sem"]["extra"], placed["lpips"]["lin"]):
    assert whole.sharding.is_fully_replicated
