"""Config files: the ``runlocal`` argument convention, every paper config with
and without it, and loading from anywhere (``configs`` is an installed package)."""

import importlib
import json
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
  assert base.parse_arg("runlocal=on", runlocal=False).runlocal
  # runlocal=maybe ran the paper-size config (read as False).
  with pytest.raises(ValueError, match=r"'runlocal=maybe': runlocal is a flag"):
    base.parse_arg("runlocal=maybe", runlocal=False)
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


@pytest.mark.parametrize("name", ["demo", "demo_eq", "demo_fqgan"])
def test_demo_batches_split_over_8_devices(name):
  """A Colab TPU v2-8 runtime has 8 devices: the demo's sampling stage
  (batch 100) stopped there after its trainers had run. Every stage's batch
  splits over 8 (evaluation pads its own)."""
  stages = importlib.import_module(f"configs.{name}").get_config().stages
  for stage in stages.keys():
    c = stages[stage]
    if c.mode == "sample":
      assert c.sample.batch_size % 8 == 0, (stage, c.sample.batch_size)
    elif c.mode == "train":
      assert c.train.global_batch_size % 8 == 0, (stage,
                                                  c.train.global_batch_size)


RUNNABLE = sorted(
    name[:-3] for name in os.listdir(os.path.dirname(base.__file__))
    if name.endswith(".py") and name not in ("__init__.py", "base.py")
    and not name.endswith("_common.py"))


@pytest.mark.parametrize("spec", PAPER)
def test_paper_batches_split_over_64_devices(spec):
  """The paper configs' batches split over every power-of-two device count
  up to 64 (a TPU v4-128 slice, 8 GPUs): RAR's sampling batch of 250 stopped
  `mode=sample` at start on 4 devices or more. Evaluation pads its own."""
  c = pc.load_config(spec)
  batches = {"train.global_batch_size": c.train.global_batch_size}
  for section in ("sample", "pretokenize"):
    if section in c:
      batches[f"{section}.batch_size"] = c[section].batch_size
  for key, batch in batches.items():
    assert batch % 64 == 0, (key, batch)


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
  # (Each paper model's own count is checked in its test file.)
  assert _param_count(local.model) < 2_000_000


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


def _model_sections(c, path="config"):
  """(dotted path, section) of every model section of ``c``
  (``base.MODEL_SECTIONS`` naming a buildable model)."""
  for p, sub in _sub_configs(c, path):
    if p.rsplit(".", 1)[-1] in base.MODEL_SECTIONS and "name" in sub:
      try:
        models.module(sub.name)
      except Exception:   # pylint: disable=broad-except
        continue
      yield p, sub


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_model_setting_is_in_the_config_at_its_default(name):
  """Each model section lists every setting of its module (so the command
  line can set it: ``--config.model.dropout`` was refused where the config
  left it to the class), and a setting at the value ``base.finish`` gave it
  builds the model it built left out: the class default, or the value
  meaning "derive it" (``CONFIG_UNSET``: RAR's mlp_dim from mlp_ratio,
  MaskGIT's code_dim from z_channels)."""
  c = importlib.import_module(f"configs.{name}").get_config()
  sections = list(_model_sections(c))
  assert sections or name in ("demo_fqgan",), name
  for path, sub in sections:
    defaults = models.config_defaults(sub.name)
    missing = sorted(set(defaults) - set(sub.keys()))
    assert not missing, (path, missing)
    built = models.build(sub)
    for key, value in defaults.items():
      if models._tuples(sub[key]) != value:   # pylint: disable=protected-access
        continue                              # the config's own value
      left_out = ml_collections.ConfigDict(
          {k: v for k, v in sub.items() if k != key})
      assert models.build(left_out) == built, (path, key)


def test_a_model_setting_the_config_file_leaves_out_is_set_on_the_command_line():
  c = pc.load_config("rar_b.py:runlocal", **{"model.dropout": 0.0,
                                             "model.attn_dropout": 0.0,
                                             "tokenizer.model.code_dim": 16})
  m = models.build(c.model)
  assert (m.dropout, m.attn_dropout) == (0.0, 0.0)
  assert models.build(c.tokenizer.model).code_dim == 16
  default = models.build(pc.load_config("rar_b.py:runlocal").model)
  assert (default.dropout, default.attn_dropout) == (0.1, 0.1)   # RAR's own


def test_records_without_the_listed_settings_match_their_defaults():
  """A checkpoint's or sample parts' record written before the configs
  listed every model setting still resumes / continues with a config that
  lists them at their defaults; one that sets another value is refused,
  naming it."""
  from genvis_jax.core import checkpoint_fit as fit  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import parts  # pylint: disable=import-outside-toplevel
  config = pc.load_config("rar_b.py:runlocal")
  listed = config.model.to_dict()
  old = {k: v for k, v in json.loads(config.model.to_json()).items()
         if k not in models.config_defaults("rar")
         or listed[k] != models.config_defaults("rar")[k]}
  assert "dropout" not in old and "name" in old
  fit.check_config_matches({"model": old}, config)
  assert fit.model_settings_note({"model": old}, config.model) == ""
  flat = parts.sample_settings(config)
  old_flat = {k: v for k, v in flat.items()
              if not k.startswith("model.") or k[len("model."):] in old}
  assert parts._model_settings(old_flat) == flat   # pylint: disable=protected-access
  # Dropout rates decide no sampled image: not recorded, not compared.
  assert not [k for k in flat if k.endswith("dropout")]
  changed = pc.load_config("rar_b.py:runlocal", **{"model.dropout": 0.0})
  with pytest.raises(fit.CheckpointMismatchError,
                     match=r"dropout: checkpoint 0\.1 vs config 0\.0"):
    fit.check_config_matches({"model": old}, changed)
  # A resume compares the other sections too: the tokenizer's model, the
  # discriminator (a tokenizer run), a demo's stages.
  from genvis_jax.train import resume  # pylint: disable=import-outside-toplevel
  for spec in ("rar_b.py:runlocal", "vq_ds16.py:runlocal", "demo.py"):
    now = json.loads(pc.load_config(spec).to_json_best_effort())
    assert resume.resumed_differences(_unlisted(now), now) == [], spec
    # Nor a record from before config.mesh.dcn_shape (every mesh section,
    # a demo's stages' too), which ran with every slice on data.
    assert resume.resumed_differences(_without_dcn(now), now) == [], spec
  now = json.loads(pc.load_config(
      "rar_b.py:runlocal", **{"mesh.dcn_shape.fsdp": 2}).to_json_best_effort())
  assert resume.resumed_differences(_without_dcn(now), now) == [
      "mesh.dcn_shape.fsdp: checkpoint 1 vs this run 2"]
  before = pc.load_config("vq_ds16.py:runlocal")
  now = json.loads(pc.load_config(
      "vq_ds16.py:runlocal", **{"disc.ndf": 8}).to_json_best_effort())
  assert resume.resumed_differences(
      _unlisted(json.loads(before.to_json_best_effort())), now) == [
          f"disc.ndf: checkpoint {before.disc.ndf} vs this run 8"]


def _without_dcn(tree):
  """A config record as written before config.mesh.dcn_shape existed."""
  if not isinstance(tree, dict):
    return tree
  return {k: ({m: _without_dcn(w) for m, w in v.items() if m != "dcn_shape"}
              if k == "mesh" and isinstance(v, dict) else _without_dcn(v))
          for k, v in tree.items()}


def _unlisted(tree):
  """A config record as written before the configs listed every model
  setting: each model section without the settings at their defaults."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    v = _unlisted(v)
    if k in base.MODEL_SECTIONS and isinstance(v, dict) and "name" in v:
      try:
        defaults = json.loads(json.dumps(models.config_defaults(v["name"])))
      except Exception:   # pylint: disable=broad-except
        defaults = {}
      v = {f: x for f, x in v.items() if f not in defaults or defaults[f] != x}
    out[k] = v
  return out


BUILDABLE = ("classifier", "dino_disc", "eq_generator", "eq_tokenizer", "far",
             "fqgan", "inception", "llamagen_vq", "maskgit_vqgan", "patchgan",
             "rar")


@pytest.mark.parametrize("name", BUILDABLE)
def test_settings_a_builder_derives_are_declared(name):
  """A field the builder derives from another when left out (doubling each
  int setting in turn shows which follow it) is in the module's
  ``CONFIG_UNSET``: listed at its class default, it would stop following
  (``--config.model.z_channels=64`` kept MaskGIT's 256-d codes)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  base_model = models.build(ml_collections.ConfigDict({"name": name}))
  fields = [f.name for f in dataclasses.fields(base_model)
            if f.name not in ("name", "parent")]
  unset = getattr(models.module(name), "CONFIG_UNSET", {})
  follows = set()
  for g in fields:
    value = getattr(base_model, g)
    if isinstance(value, bool) or not isinstance(value, int) or not value:
      continue
    try:
      m = models.build(ml_collections.ConfigDict({"name": name, g: 2 * value}))
    except Exception:   # pylint: disable=broad-except
      continue          # a value the model refuses
    follows |= {f for f in fields if f != g and f not in models.SHARED_DEFAULTS
                and getattr(m, f) != getattr(base_model, f)}
  assert follows == set(unset), (follows, unset)


def test_fqgan_demo_stage_configs_run_on_their_own():
  """``fqgan_demo.py --config.mode=pretokenize`` encodes the demo images as
  the demo's stage does (it read ImageNet at 256 px), and ``far_demo.py``
  decodes with the demo tokenizer (it named the paper FQGAN)."""
  from configs import demo_fqgan, far_demo, fqgan_demo  # pylint: disable=import-outside-toplevel
  stages = demo_fqgan.get_config().stages
  alone = fqgan_demo.get_config().pretokenize
  staged = stages.pretokenize.pretokenize
  for key in ("source", "name", "image_size", "num_classes"):
    assert alone.data[key] == staged.data[key], key
  assert alone.ten_crop == staged.ten_crop
  assert far_demo.get_config().tokenizer.model == stages.far.tokenizer.model


@pytest.mark.parametrize("spec", ["fqgan_dual_ds16.py", "vq_ds16.py"])
def test_the_discriminator_computes_in_the_models_dtype(spec):
  """FQGAN's PatchGAN runs under the official autocast with the tokenizer:
  ``--config.model.dtype=float32`` left it in bf16 (a copy, not a link)."""
  c = pc.load_config(spec, **{"model.dtype": "float32"})
  assert c.model.dtype == c.disc.dtype == "float32"
  assert pc.load_config(spec).disc.dtype == "bfloat16"
  # One way only: the discriminator's own setting leaves the tokenizer's.
  c = pc.load_config(spec, **{"disc.dtype": "float32"})
  assert (c.model.dtype, c.disc.dtype) == ("bfloat16", "float32")


def test_the_sampling_latent_scale_leaves_the_training_latents():
  """``sample.latent_scale`` follows ``latents.scale``; a bare reference
  made ``--config.sample.latent_scale`` set the training latents' too."""
  c = pc.load_config("eq_s.py:runlocal", **{"latents.scale": 0.5})
  assert c.sample.latent_scale == c.latents.scale == 0.5
  c = pc.load_config("eq_s.py:runlocal", **{"sample.latent_scale": 0.1})
  assert (c.latents.scale, c.sample.latent_scale) == (0.2, 0.1)
