"""Config files: the ``runlocal`` argument convention, every paper config with
and without it, and loading from anywhere (``configs`` is an installed package)."""

import importlib
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest

from configs import base
from genvis_jax import models
from tests import pipeline_common as pc

# Every paper config and the argument it is run with (see README).
PAPER = ("maskgit_vqgan.py", "rar_b.py", "rar_l.py", "rar_xl.py", "rar_xxl.py",
         "vq_ds16.py", "vq_ds8.py", "fqgan_dual_ds16.py", "fqgan_dual_ds8.py",
         "fqgan_triple_ds16.py", "fqgan_triple_ds8.py", "far_b.py:dual",
         "far_b.py:triple", "far_l.py:dual", "far_l.py:triple",
         "eq_tokenizer.py", "eq_s.py", "eq_b.py", "eq_l.py", "eq_h.py")


def test_a_batch_given_with_runlocal_is_kept():
  """``far_b.py:dual,runlocal,batch=12`` trained at runlocal's batch of 16
  without a word."""
  from configs import eq_s, far_b  # pylint: disable=import-outside-toplevel
  for get in (far_b.get_config, eq_s.get_config):
    assert get("runlocal").train.global_batch_size == 16
    assert get("runlocal,batch=12").train.global_batch_size == 12
  assert base.parse_arg("dual,runlocal,batch=12", positional=("variant",),
                        variant="dual", runlocal=False, batch=256).given == (
                            "variant", "runlocal", "batch")


def test_parse_arg():
  a = base.parse_arg("triple,runlocal", positional=("variant",),
                     variant="dual", runlocal=False)
  assert (a.variant, a.runlocal) == ("triple", True)
  a = base.parse_arg("", positional=("variant",), variant="dual", runlocal=False)
  assert (a.variant, a.runlocal) == ("dual", False)
  assert base.parse_arg("runlocal=false,n=3", runlocal=True, n=1).n == 3
  with pytest.raises(ValueError, match="runlcal"):
    base.parse_arg("runlcal", runlocal=False)
  with pytest.raises(ValueError, match="'quad'"):   # no positional left
    base.parse_arg("dual,quad", positional=("variant",), variant="dual",
                   runlocal=False)
  with pytest.raises(ValueError, match=r"'batch=2k'.*takes an int \(default 256\)"):
    base.parse_arg("batch=2k", batch=256)
  with pytest.raises(ValueError, match="'batch=0'.*must be positive"):
    base.parse_arg("batch=0", batch=256)
  with pytest.raises(ValueError, match=r"'runlocal'; this config takes none"):
    base.parse_arg("runlocal")
  with pytest.raises(ValueError, match=r"takes smoke \(a flag\).*X\.py:smoke\)"):
    base.parse_arg("runlocal", smoke=False)


@pytest.mark.parametrize("name", ["demo", "demo_eq", "demo_fqgan", "far_demo",
                                  "fqgan_demo"])
def test_demo_configs_refuse_arguments_they_do_not_take(name):
  """``configs/demo.py:runlocal`` ran the whole demo, the argument unread."""
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError, match="Unknown config argument 'runlocal'"):
    module.get_config("runlocal")


RUNNABLE = sorted(
    name[:-3] for name in os.listdir(os.path.dirname(base.__file__))
    if name.endswith(".py") and name not in ("__init__.py", "base.py")
    and not name.endswith("_common.py"))


def _sub_configs(c, path="config"):
  """(dotted path, ConfigDict) of ``c`` and every ConfigDict inside it."""
  yield path, c
  for key in c.keys():
    if isinstance(c[key], ml_collections.ConfigDict):
      yield from _sub_configs(c[key], f"{path}.{key}")


@pytest.mark.parametrize("name", RUNNABLE)
def test_runnable_configs_refuse_a_misspelt_key(name):
  """Built in Python (a notebook) a config refuses a key it does not have,
  naming the near one, as ``--config.KEY`` does (a misspelt field set in
  Python was ignored: the run trained with the default); its keys change."""
  c = importlib.import_module(f"configs.{name}").get_config()
  # Every nested config too (lock() stops at one already locked, so one
  # swapped into a locked config stays open; the CLI's lock does the same).
  open_ = [p for p, sub in _sub_configs(c) if not sub.is_locked]
  assert not open_, open_
  with pytest.raises(AttributeError, match='Did you mean "mode"'):
    c.mdoe = "sample"
  c.mode = c.mode
  if "train" in c:
    with pytest.raises(AttributeError, match='Did you mean "num_steps"'):
      c.train.num_step = 2
    c.train.num_steps = 2


@pytest.mark.parametrize("spec,batch,steps,lr,warmup", [
    # Equivariant: lr = 1e-4 x batch / 256, 1200 epochs, 100 warm-up epochs.
    ("eq_s.py", 2048, 1200 * 625, 8e-4, 100 * 625),
    ("eq_s.py:batch=1024", 1024, 1200 * 1251, 4e-4, 100 * 1251),
    # FAR: lr 1e-4 at any batch, 300 epochs (DistributedSampler + drop_last:
    # 5004 steps per epoch at 256), no warm-up.
    ("far_b.py:dual", 256, 1_501_200, 1e-4, 0),
    ("far_b.py:triple,batch=512", 512, 300 * 2502, 1e-4, 0)])
def test_epoch_recipes_follow_the_batch(spec, batch, steps, lr, warmup):
  """Steps per epoch are ImageNet's 1,281,167 images // batch, as the
  official loaders drop the last partial batch."""
  c = pc.load_config(spec)
  assert c.train.global_batch_size == batch
  assert c.train.num_steps == steps
  assert c.optimizer.lr == pytest.approx(lr, rel=1e-12)
  assert c.optimizer.warmup_steps == warmup


def _param_count(model_config) -> int:
  shapes = jax.eval_shape(lambda: models.init_params(model_config,
                                                     jax.random.key(0)))
  return sum(x.size for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("spec", PAPER)
def test_runlocal_shrinks_only_sizes(spec):
  """runlocal keeps the task, losses, schedules and samplers of the paper
  config; only sizes, steps, batch and data change."""
  sep = "," if ":" in spec else ":"
  paper, local = pc.load_config(spec), pc.load_config(spec + sep + "runlocal")
  assert local.task == paper.task and local.mode == paper.mode
  assert local.model.name == paper.model.name
  assert local.optimizer.name == paper.optimizer.name
  assert local.optimizer.schedule == paper.optimizer.schedule
  # A warm-up only where the recipe has one.
  assert (local.optimizer.warmup_steps > 0) == (paper.optimizer.warmup_steps > 0)
  for block in ("loss", "sample", "flow", "pretokenize", "disc"):
    if block in paper:
      assert set(local[block].keys()) == set(paper[block].keys()), block
  for key in ("gan", "adaptive_gan_weight", "reconstruction"):
    if "loss" in paper and key in paper.loss:
      assert local.loss[key] == paper.loss[key], key
  if "pretokenize" in paper:
    assert local.pretokenize.ten_crop == paper.pretokenize.ten_crop
  if "tokenizer" in paper:
    assert local.tokenizer.model.name == paper.tokenizer.model.name
  images = local.pretokenize.data if paper.data.source == "tokens" else local.data
  assert local.data.source == paper.data.source or images is local.data
  assert images.source.startswith("demo") and images.image_size <= 32
  # Images it names (a reference of them, a tokenizer's) are that size too.
  assert local.data.image_size == images.image_size
  if "image_size" in local.get("tokenizer", {}).get("model", {}):
    assert local.tokenizer.model.image_size == images.image_size
  assert local.train.num_steps <= 100 and local.train.global_batch_size <= 16
  assert local.train.num_steps < paper.train.num_steps
  assert _param_count(local.model) < 2_000_000 < _param_count(paper.model)


def _schedule_points(c) -> dict:
  """Step counts of a config's cadences and schedule points (> 0)."""
  points = {}
  for block in ("train", "optimizer", "loss"):
    for k, v in c.get(block, {}).items():
      if (k.endswith(("_start", "_end", "_every", "warmup_steps"))
          and isinstance(v, int) and v > 0):
        points[f"{block}.{k}"] = v
  return points


@pytest.mark.parametrize("spec", ["rar_xl.py:runlocal", "far_b.py:dual,runlocal",
                                  "eq_tokenizer.py:runlocal", "eq_s.py:runlocal",
                                  "maskgit_vqgan.py:runlocal",
                                  "fqgan_dual_ds16.py:runlocal"])
def test_runlocal_schedule_follows_num_steps(spec):
  """``--config.train.num_steps`` raised on the command line moves every
  cadence and schedule point of a runlocal config with it (RAR's anneal,
  warm-up, GAN start, checkpoints), not only the step count; a point given
  on the command line stays as given."""
  default = pc.parse_config_args([f"--config=configs/{spec}"])
  longer = pc.parse_config_args([f"--config=configs/{spec}",
                                 "--config.train.num_steps=1000"])
  steps = default.train.num_steps
  assert 1000 % steps == 0
  before, after = _schedule_points(default), _schedule_points(longer)
  assert set(before) >= {"train.log_every", "train.checkpoint_every"}
  assert {k: v * (1000 // steps) for k, v in before.items()} == after
  if default.train.ema_decay:
    assert longer.train.ema_decay == pytest.approx(1000 / 1005)
    short = pc.parse_config_args([f"--config=configs/{spec}",
                                  "--config.train.num_steps=2"])
    assert 0 < short.train.ema_decay < default.train.ema_decay
  pickle.loads(pickle.dumps(longer))   # e.g. for worker processes
  pinned = pc.parse_config_args([f"--config=configs/{spec}",
                                 "--config.train.checkpoint_every=7",
                                 "--config.train.num_steps=1000"])
  assert (pinned.train.checkpoint_every, pinned.train.log_every) == (7, 250)


def test_configs_load_from_any_directory(tmp_path):
  """A user's script in another folder loads a config file with ml_collections
  (no sys.path edits: ``configs`` is installed with the package)."""
  script = tmp_path / "load.py"
  script.write_text(textwrap.dedent(f"""
      from absl import flags
      from ml_collections import config_flags
      argv = ["x", "--config={pc.ROOT}/configs/far_b.py:triple,runlocal"]
      fv = flags.FlagValues()
      config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                      sys_argv=argv)
      fv(argv)
      print(fv.config.model.num_codebooks, fv.config.tokenizer.model.name)
  """))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["3", "fqgan"]


def _with_tokenizer(spec):
  """(name, config) of ``spec`` and of each of its stages with a tokenizer."""
  c = pc.load_config(spec)
  found = [(spec, c)] if "tokenizer" in c else []
  for name, stage in (c.get("stages") or {}).items():
    if "tokenizer" in stage:
      found.append((f"{spec} stage {name}", stage))
  return found


GENERATORS = [s + a for s in PAPER if s.startswith(("rar", "far", "eq_"))
              and s != "eq_tokenizer.py"
              for a in ("", ("," if ":" in s else ":") + "runlocal")] + [
                  "eq_demo.py:generator", "far_demo.py", "demo.py",
                  "demo_eq.py", "demo_fqgan.py"]


@pytest.mark.parametrize("spec", ["fqgan_demo.py", "eq_demo.py:tokenizer"])
def test_demo_tokenizer_configs_evaluate_as_documented(spec):
  """``--config.mode=evaluate --config.evaluate.checkpoint=DIR`` with a demo
  tokenizer's config (the README's command) asks for no more images than
  its data's eval split holds (the paper default, 50k, cannot run)."""
  from genvis_jax.data import pipeline
  c = pc.load_config(spec)
  assert c.evaluate.kind == "tokenizer"
  split = len(pipeline.make_source(c.data, c.data.eval_split)[0])
  assert 0 < c.evaluate.num_images <= split, (c.evaluate.num_images, split)


@pytest.mark.parametrize("spec", GENERATORS)
def test_tokenizer_config_file_holds_that_tokenizer(spec):
  """``config.tokenizer.config_file``, which the kind=tokenizer error tells
  users to evaluate with, builds the very tokenizer the generator uses; every
  generator's tokenizer has the keys ``base.add_tokenizer`` sets (a missing
  one cannot be overridden from the command line)."""
  for name, c in _with_tokenizer(spec):
    assert set(c.tokenizer.keys()) == {
        "model", "checkpoint", "dtype", "uint8", "config_file"}, name
    where = c.tokenizer.get("config_file", "")
    if not where:   # the demo's MaskGIT tokenizer has no config file of its own
      assert spec == "demo.py" or models.is_image_tokenizer(c.model), name
      continue
    assert where.startswith("configs/"), (name, where)
    tok = pc.load_config(where[len("configs/"):])
    assert tok.model.to_dict() == c.tokenizer.model.to_dict(), (name, where)
    assert tok.evaluate.kind == "tokenizer", (name, where)
