"""Bad settings and missing input are refused at start-up, before the workdir
is written or anything compiles, with a message that names the problem and
the fix."""

import errno
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo
from genvis_jax import modes
from genvis_jax.data import DataNotFoundError
from genvis_jax.errors import UserError
from genvis_jax.train import checks
from tests import pipeline_common as pc
from genvis_jax.train import trainer as trainer_lib


def test_missing_dataset_fails_before_compiling(tmp_path, monkeypatch):
  c = demo.classifier_config()
  c.data.source = "image_folder"
  c.data.path = str(tmp_path / "nowhere")
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
  with pytest.raises(DataNotFoundError, match="nowhere"):
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not compiled
  assert not (tmp_path / "wd").exists()


def test_a_generator_that_encodes_its_images_needs_the_tokenizer(tmp_path):
  """Refused before the workdir is written (the first step failed, leaving
  a TensorBoard file)."""
  from genvis_jax.errors import ConfigError
  from genvis_jax.train import trainer as trainer_lib
  from tests import pipeline_common as pc
  with pytest.raises(ConfigError, match=r"eq_generator task trains on its "
                     r"images' latents .*set --config.tokenizer.checkpoint"):
    trainer_lib.train_and_evaluate(pc.load_config("eq_s.py:runlocal"),
                                   str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_a_token_generator_on_images_is_told_to_pretokenize(tmp_path):
  """FAR on an image folder was refused for crops_per_epoch first, and then,
  once that was set as told, failed with a KeyError after compiling."""
  from genvis_jax.data.sources import DataConfigError
  from genvis_jax.train import trainer as trainer_lib
  from tests import pipeline_common as pc
  c = pc.load_config("far_b.py:dual,runlocal")
  c.data.source, c.data.path = "image_folder", str(tmp_path / "images")
  with pytest.raises(DataConfigError, match=r"^config.data.source="
                     r"'image_folder' gives images, and the far task trains on "
                     r"pre-tokenized codes: pre-tokenize them first .* then "
                     r"set --config.data.source=tokens and --config.data.path"):
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


IMAGES = "demo, demo_landscapes, image_folder, tfds"
SOURCE_CASES = {
    # RAR called 'bogus' images and told to pre-tokenize them.
    "unknown_for_tokens": (
        "rar_b.py:runlocal", {"data.source": "bogus"},
        r"^Unknown config.data.source 'bogus'; the rar task trains on "
        r"pre-tokenized codes: set --config.data.source=tokens and "
        r"--config.data.path to the token files"),
    "unknown_for_images": (
        "maskgit_vqgan.py:runlocal", {"data.source": "bogus"},
        rf"^Unknown config.data.source 'bogus'; the tokenizer task trains on "
        rf"images: set --config.data.source to one of {IMAGES}\.$"),
    # A tokenizer on tokens was told to set config.data.path to token files.
    "tokenizer_on_tokens": (
        "maskgit_vqgan.py:runlocal", {"data.source": "tokens"},
        rf"^config.data.source='tokens' gives pre-tokenized codes, and the "
        rf"tokenizer task trains on images: set --config.data.source to one "
        rf"of {IMAGES}\.$"),
    # Was told to pass --config.pretokenize.data.source=bogus.
    "pretokenize_unknown_data": (
        "rar_b.py:runlocal", {"mode": "pretokenize", "data.source": "bogus"},
        rf"^Unknown config.data.source 'bogus'; config.data is the "
        rf"generator's training input, its token files \(source 'tokens'\), "
        rf"and pre-tokenizing reads the images of config.pretokenize.data "
        rf"\(sources: {IMAGES}\)"),
    "pretokenize_tokens": (
        "rar_b.py:runlocal", {"mode": "pretokenize",
                              "pretokenize.data.source": "tokens"},
        r"^config.pretokenize.data.source='tokens' gives pre-tokenized codes, "
        r"and pre-tokenizing encodes images: set "
        r"--config.pretokenize.data.source to one of"),
    "evaluate_tokenizer_on_tokens": (
        "maskgit_vqgan.py:runlocal", {"mode": "evaluate",
                                      "evaluate.kind": "tokenizer",
                                      "data.source": "tokens"},
        r"^config.data.source='tokens' gives pre-tokenized codes, and "
        r"config.evaluate.kind=tokenizer reconstructs images"),
    "evaluate_reference_unknown": (
        "rar_b.py:runlocal", {"mode": "evaluate", "evaluate.kind": "reference",
                              "data.source": "bogus"},
        r"^Unknown config.data.source 'bogus'; config.evaluate.kind=reference "
        r"computes Inception statistics of images"),
}


@pytest.mark.parametrize("name", list(SOURCE_CASES))
def test_a_source_is_called_unknown_or_imageless_where_images_are_read(
    name, tmp_path):
  """Every mode names an unknown config.data.source as unknown, and a
  'tokens' source where images are read as giving none, listing the valid
  sources; before any data is opened (whose error would mislead)."""
  from tests import pipeline_common as pc
  spec, overrides, pattern = SOURCE_CASES[name]
  with pytest.raises(UserError, match=pattern):
    pc.run_mode(spec, tmp_path / "wd", **overrides)


def test_missing_token_files_say_how_to_make_them(tmp_path):
  c = demo.rar_config()
  c.data.path = str(tmp_path / "tokens-*.array_record")
  with pytest.raises(DataNotFoundError, match="pretokenize"):
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))


# Values no training can use, each named with its key before the workdir is
# written (they trained on: an EMA of 1.5 saved NaN/Inf weights, a negative
# lr ran gradient ascent, float16 trained without loss scaling).
IMPOSSIBLE = {
    "ema_above_1": ("classifier", "train.ema_decay", 1.5,
                    r"config.train.ema_decay=1.5 must be in \[0, 1\)"),
    "ema_negative": ("classifier", "train.ema_decay", -0.5,
                     r"config.train.ema_decay=-0.5 must be in \[0, 1\)"),
    "lr_negative": ("classifier", "optimizer.lr", -1.0,
                    r"config.optimizer.lr=-1.0 must be finite and >= 0: a "
                    r"negative learning rate climbs the loss"),
    # NaN or a negative clip turned clipping off without a word.
    "grad_clip_nan": ("classifier", "train.grad_clip", float("nan"),
                      r"config.train.grad_clip=nan must be finite and >= 0"),
    "grad_clip_negative": ("tokenizer", "train.grad_clip", -1.0,
                           r"config.train.grad_clip=-1.0 must be finite and "
                           r">= 0: .*0 turns clipping off"),
    "warmup_negative": ("classifier", "optimizer.warmup_steps", -10,
                        r"config.optimizer.warmup_steps=-10 must be >= 0"),
    "weight_decay_negative": ("classifier", "optimizer.weight_decay", -0.1,
                              r"config.optimizer.weight_decay=-0.1 must be"),
    "disc_lr_negative": ("tokenizer", "disc.optimizer.lr", -1e-4,
                         r"config.disc.optimizer.lr=-0.0001 must be finite"),
    "model_float16": ("tokenizer", "model.dtype", "float16",
                      r"config.model.dtype='float16': training has no loss "
                      r"scaling.*--config.model.dtype=bfloat16"),
    "disc_float16": ("tokenizer", "disc.dtype", "float16",
                     r"config.disc.dtype='float16'.*bfloat16"),
    "disc_params_float16": ("tokenizer", "disc.param_dtype", "float16",
                            r"config.disc.param_dtype='float16': training has "
                            r"no loss"),
    # jax keys keep the low 32 bits: seed 2**32 trained as seed 0.
    "seed_past_32_bits": ("classifier", "seed", 2**32,
                          r"config.seed=4294967296 must be an integer in "
                          r"\[0, 2\*\*32\)"),
    "seed_negative": ("classifier", "seed", -1,
                      r"config.seed=-1 must be an integer in \[0, 2\*\*32\)"),
    # Read by another optimizer / schedule only: ignored without a word.
    "weight_decay_under_adam": ("rar", "optimizer.name", "adam",
                                r"config.optimizer.weight_decay=0.03 is read "
                                r"only with config.optimizer.name='adamw', "
                                r"and config.optimizer.name='adam' would "
                                r"ignore it"),
    "end_lr_under_constant": ("classifier", "optimizer.end_lr", 1e-5,
                              r"config.optimizer.end_lr=1e-05 is read only "
                              r"with config.optimizer.schedule='cosine'"),
    # --config.optimizer.no_decay= : every parameter exempt, silently.
    "no_decay_empty": ("classifier", "optimizer.no_decay", ("",),
                       r"config.optimizer.no_decay entry '' is empty: it "
                       r"matches every parameter"),
}


def _set(config, key, value):
  *path, last = key.split(".")
  for part in path:
    config = config[part]
  config[last] = value


@pytest.mark.parametrize("name", list(IMPOSSIBLE))
def test_impossible_training_values_are_refused_before_the_workdir(
    name, tmp_path, monkeypatch):
  from genvis_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  job, key, value, pattern = IMPOSSIBLE[name]
  c = getattr(demo, f"{job}_config")()
  _set(c, key, value)

  def read_data(*args, **kwargs):   # the step after the checks
    raise AssertionError(f"{key}={value!r} passed the checks")

  monkeypatch.setattr(trainer_lib, "create_train_iterator", read_data)
  with pytest.raises(ConfigError, match=pattern):
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_the_edge_values_that_train_are_kept():
  """ema_decay=0 (no EMA), lr=0 and end_lr=0 are settings, not mistakes;
  float16 stays an inference precision (config.tokenizer.dtype)."""
  from configs import rar_b  # pylint: disable=import-outside-toplevel
  from genvis_jax import errors  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import optimizers as opt_lib  # pylint: disable=import-outside-toplevel
  c = demo.classifier_config()
  c.train.ema_decay, c.optimizer.lr, c.optimizer.end_lr = 0.0, 0.0, 0.0
  c.optimizer.schedule = "cosine"
  trainer_lib.setup(c)
  with pytest.raises(errors.ConfigError, match=r"ema_decay=1 must be in \[0, 1\)"):
    checks.check_ema(ml_collections.ConfigDict(dict(ema_decay=1.0)))   # never follows
  rar = rar_b.get_config("runlocal")
  rar.tokenizer.dtype = "float16"
  checks.check_precision(rar)
  # Read only by that schedule, and checked with it (a division by zero).
  c.optimizer.update(dict(schedule="step_decay", decay_every=0, decay_rate=0.5))
  with pytest.raises(errors.ConfigError,
                     match=r"config.optimizer.decay_every=0 must be at least 1"):
    opt_lib.make_optimizer(c.optimizer, c.train)
  # Its warm-up of 1 leaves a learning rate of 0 (eq_tokenizer.py:runlocal
  # at 4 steps trained nothing, without a word).
  c.optimizer.update(dict(decay_every=3, warmup_steps=1))
  with pytest.raises(errors.ConfigError,
                     match=r"config.optimizer.warmup_steps=1 with the "
                           r"step_decay schedule: .* would never update"):
    opt_lib.make_optimizer(c.optimizer, c.train)
  # Not a number (a string in a config file): named too, not a bare float().
  with pytest.raises(errors.ConfigError,
                     match=r"config.optimizer.lr='1e-4x' must be finite"):
    opt_lib.check_config(ml_collections.ConfigDict(dict(
        name="adamw", schedule="constant", lr="1e-4x")))


def test_a_discriminators_optimizer_is_named_in_its_errors():
  """A bad schedule or optimizer name under config.disc.optimizer blamed
  config.optimizer, whose values were fine."""
  from genvis_jax import errors  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import optimizers as opt_lib  # pylint: disable=import-outside-toplevel
  c = demo.classifier_config()
  disc = "config.disc.optimizer"
  for key, bad in (("schedule", "cosin"), ("name", "adamww")):
    wrong = ml_collections.ConfigDict(c.optimizer.to_dict())
    wrong.update({"schedule": "constant", key: bad})
    with pytest.raises(errors.ConfigError,
                       match=rf"Unknown {disc}.{key} '{bad}'"):
      opt_lib.make_optimizer(wrong, c.train, disc)
  with pytest.raises(errors.ConfigError,
                     match=rf"--{disc}.no_decay='\(\)'"):
    opt_lib.check_config(ml_collections.ConfigDict(dict(no_decay=("",))),
                         disc)


def test_a_no_decay_pattern_matching_nothing_is_named(caplog):
  """``--config.optimizer.no_decay=bias,scale`` is one pattern that matches
  no parameter: every weight decays. Warned once, with the tuple form."""
  import logging  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import optimizers as opt_lib  # pylint: disable=import-outside-toplevel
  params = {"dense": {"bias": 0.0, "kernel": 0.0}}
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      mask = opt_lib.decay_mask(params, ("bias,scale", "bias"))
  assert mask == {"dense": {"bias": False, "kernel": True}}
  said = [r.getMessage() for r in caplog.records if "matches no" in r.getMessage()]
  assert said == ["config.optimizer.no_decay: pattern 'bias,scale' matches no "
                  "parameter (e.g. 'dense/bias'), so it exempts none from weight "
                  "decay: each pattern is its own entry, e.g. --config.optimizer."
                  "no_decay='(\"bias\",\"scale\")'."]


def test_a_warm_up_as_long_as_the_run_is_warned(caplog):
  """``rar_b.py --config.train.num_steps=50000`` kept the recipe's 62,500
  warm-up steps: the learning rate never reached its peak and the cosine
  decay never began, with no word (the anneal points were warned about)."""
  import logging  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import optimizers as opt_lib  # pylint: disable=import-outside-toplevel
  c = pc.load_config("rar_b.py", **{"train.num_steps": 50_000})
  with caplog.at_level(logging.WARNING):
    opt_lib.warn_long_warmup(c.optimizer, c.train.num_steps)
  said = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
  assert said == [
      "config.optimizer.warmup_steps=62500 is not below config.train."
      "num_steps=50000: the learning rate never reaches config.optimizer.lr="
      "0.0004 (it ends near 0.00032, and the cosine decay never starts). Set "
      "the warm-up with the steps, e.g. --config.optimizer.warmup_steps=12500."]
  caplog.clear()
  paper = pc.load_config("rar_b.py")    # 62,500 of 250,000 steps
  with caplog.at_level(logging.WARNING):
    opt_lib.warn_long_warmup(paper.optimizer, paper.train.num_steps)
  assert not caplog.records
  # A training run's checks say it once, for each group's own optimizer.
  c = pc.load_config("fqgan_dual_ds16.py:runlocal", **{
      "train.num_steps": 20, "disc.optimizer.warmup_steps": 30})
  with caplog.at_level(logging.WARNING):
    trainer_lib.setup(c)
  said = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
  assert len(said) == 1 and said[0].startswith(
      "config.disc.optimizer.warmup_steps=30 is not below"), said


def test_indivisible_batch(tmp_path):
  c = demo.classifier_config()
  c.train.global_batch_size = 30      # 8 devices
  with pytest.raises(ValueError, match="Use a multiple of 8"):
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))


def test_read_only_workdir_is_refused_before_any_compute(tmp_path, monkeypatch):
  """An existing folder that refuses files (a read-only mount; faked: the
  tests may run as root, whom permissions do not stop)."""
  wd = tmp_path / "ro"
  wd.mkdir()
  real = modes.tempfile.TemporaryFile

  def read_only(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if dir == str(wd):
      raise OSError(errno.EROFS, "Read-only file system")
    return real(*args, dir=dir, **kwargs)
  monkeypatch.setattr(modes.tempfile, "TemporaryFile", read_only)
  with pytest.raises(UserError, match=r"--workdir=.*/ro cannot be used as a "
                     r"directory \(Read-only file system\); choose another"):
    modes.check_workdir(str(wd))
  assert modes.check_workdir(str(tmp_path / "new")) == str(tmp_path / "new")


def test_remote_paths_that_must_be_local_say_so(tmp_path, monkeypatch):
  """A gs:// workdir for the demo, image folder or pre-tokenizing output is
  refused naming the fix, before any stage runs, and no local folder named
  "gs:" is made (the demo made one, then failed at its 4th stage)."""
  from genvis_jax import demo as demo_lib  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import sources  # pylint: disable=import-outside-toplevel
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match=r"--workdir=gs://b/demo is remote"):
    demo_lib.run(pc.load_config("demo.py"), "gs://b/demo")
  with pytest.raises(UserError, match=r"config.data.path='gs://b/images' is "
                     r"remote; image folders are read from local disk"):
    sources.resolve_split_dir("gs://b/images", "train")
  rar = pc.load_config("rar_b.py:runlocal", mode="pretokenize")
  assert modes.lock_dir(rar, "gs://b/run") == ("gs://b/run/tokens", None)
  assert not os.listdir(tmp_path)


def test_a_multi_process_environment_is_checked_before_jax_reads_it():
  """JAX_COORDINATOR_ADDRESS without JAX_NUM_PROCESSES (a KeyError), a
  process id that is not a number or past the count (jax's ValueError):
  tracebacks where one message names the three variables."""
  from genvis_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import distributed  # pylint: disable=import-outside-toplevel
  env = {"JAX_COORDINATOR_ADDRESS": "host:1234"}
  for extra in ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"},
                {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
                {"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}):
    with pytest.raises(ConfigError, match=r"JAX_COORDINATOR_ADDRESS=host:1234 "
                       r"starts a multi-process run, which also needs "
                       r"JAX_NUM_PROCESSES .*got JAX_NUM_PROCESSES="):
      distributed.process_settings({**env, **extra})
  assert distributed.process_settings(
      {**env, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == {
          "num_processes": 2, "process_id": 1}


def test_which_hosts_join_a_distributed_run(monkeypatch):
  """A pod slice's workers and the hosts of a multislice job join one run
  (the latter, with one worker per slice, went without jax's distributed
  runtime: no preemption sync, no coordination service); one host does not."""
  from genvis_jax.train import distributed  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for env, joins in (({}, False), ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
                     ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
                     ({"TPU_WORKER_HOSTNAMES": "w0", "MEGASCALE_NUM_SLICES": "2"},
                      True),
                     ({"MEGASCALE_NUM_SLICES": " 2"}, True),
                     ({"MEGASCALE_NUM_SLICES": "1"}, False),
                     ({"MEGASCALE_NUM_SLICES": "\u00b2"}, False),
                     ({"MEGASCALE_NUM_SLICES": "x"}, False)):
    for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES"):
      monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
      monkeypatch.setenv(k, v)
    calls.clear()
    distributed.maybe_initialize()
    assert calls == ([{}] if joins else []), env


def test_a_start_from_weights_that_cannot_load_is_refused_before_the_data(
    tmp_path, monkeypatch):
  """--config.init_from naming nothing loadable (a typo; a stage 1 run that
  has saved no step yet) or init_groups the task lacks were refused only
  after the data were opened and the state built: 33-38 s on the tiny
  configs, minutes on a pod, past the launcher's start-up check."""
  from genvis_jax.core import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from genvis_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

  def read_data(*args, **kwargs):   # the step after the checks
    raise AssertionError("the data were opened")

  monkeypatch.setattr(trainer_lib, "create_train_iterator", read_data)
  c, wd = demo.classifier_config(), tmp_path / "wd"
  c.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"No checkpoint at .*nowhere \(--config.init_from\)"):
    trainer_lib.train_and_evaluate(c, str(wd))
  (tmp_path / "stage1" / "checkpoints").mkdir(parents=True)
  c.init_from = str(tmp_path / "stage1")
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"No checkpoint under .*stage1/checkpoints "
                           r"\(--config.init_from\): the run has not saved"):
    trainer_lib.train_and_evaluate(c, str(wd))
  c.init_groups = ("disc",)
  with pytest.raises(ConfigError, match=r"init_groups=\('disc',\) names "
                     r"\['disc'\].*other parameter groups are none"):
    trainer_lib.train_and_evaluate(c, str(wd))
  # A group asked of a parameter checkpoint (a model's weights alone).
  from genvis_jax.core import weights as weights_lib  # pylint: disable=import-outside-toplevel
  weights_lib.save_params(str(tmp_path / "converted"),
                          {"dense": {"kernel": np.zeros((2, 3), np.float32)}})
  t = demo.tokenizer_config()
  t.init_from, t.init_groups = str(tmp_path / "converted"), ("disc",)
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"is a parameter checkpoint: .* not the 'disc' "
                           r"parameters"):
    trainer_lib.train_and_evaluate(t, str(wd))
  assert not wd.exists()


@pytest.mark.parametrize("key", ["model.name", "task"])
def test_a_misspelt_registered_name_is_refused_by_the_first_check(key):
  """By ``modes.check_names``, before any device starts: the first and only
  message (a later check would name it too, after the start-up's logs)."""
  from genvis_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  config = pc.load_config("rar_b.py:runlocal", **{key: "rar_b"})
  with pytest.raises(ConfigError, match=rf"Unknown config.{key}='rar_b'"):
    modes.check_names(config)


def test_a_classifier_kind_needs_the_classifier_and_its_weights():
  """kind=class_score / demo_fid score with the demo's classifier: a config
  of another model, or without its weights, is refused naming the kind."""
  from genvis_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from genvis_jax.evaluate import driver  # pylint: disable=import-outside-toplevel
  driver.check_config(demo.score_config())
  other, unweighted = demo.score_config(), demo.score_config()
  other.model.name = "rar"
  del unweighted.evaluate["classifier_checkpoint"]
  for config in (other, unweighted):
    with pytest.raises(ConfigError, match=r"kind='class_score' scores samples "
                       r"with the demo's classifier"):
      driver.check_config(config)
