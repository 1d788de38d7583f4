"""Bad input fails early with a message that names the problem and the fix."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo
from genvis_jax import cli
from genvis_jax import modes
from genvis_jax.data import DataNotFoundError
from genvis_jax.errors import UserError
from genvis_jax.train import checks
from genvis_jax.train import trainer as trainer_lib
from tests import xla_flags


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


def test_failed_run_leaves_no_empty_workdir_it_created(tmp_path):
  c = demo.classifier_config()
  c.mode = "train"
  c.data.source = "image_folder"
  c.data.path = str(tmp_path / "nowhere")
  fresh = tmp_path / "new" / "wd"
  with pytest.raises(DataNotFoundError):
    modes.run(c, str(fresh))
  assert not (tmp_path / "new").exists()   # nor the parent it made
  # Failing once the workdir is locked: its lock file goes too.
  from genvis_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  locked = demo.classifier_config()
  locked.mode, locked.init_from = "train", str(tmp_path / "no_such_run")
  with pytest.raises(UserError, match="no_such_run"):
    modes.run(locked, str(fresh))
  assert not (tmp_path / "new").exists()
  kept = tmp_path / "kept"            # the user's folder: stays, files and all
  (kept / "empty").mkdir(parents=True)
  with pytest.raises(DataNotFoundError):
    modes.run(c, str(kept))
  assert (kept / "empty").is_dir()
  # Only empty folders go: one with a file in it stays.
  (fresh / "a" / "b").mkdir(parents=True)
  (fresh / "a" / "note.txt").write_text("x")
  modes.remove_empty_dirs(str(fresh))
  assert (fresh / "a" / "note.txt").exists() and not (fresh / "a" / "b").exists()


def test_sigterm_outside_a_clean_stop_ends_a_mode_with_one_line(
    tmp_path, monkeypatch, capsys):
  """jax.distributed's preemption notifier takes SIGTERM; only train, sample
  and demo act on it, in their loops. Outside those, on one process, SIGTERM
  stops a mode at once with one line and 128 + 15 (pre-tokenizing,
  evaluation, and training or sampling while they started up exited 143
  without a word); on several the modes without a clean stop end by the
  default action (no wait for a collective) and the others keep the
  notifier; the handler before is back afterwards."""
  seen = {}

  def fake_mode(config, workdir):
    del workdir
    seen[config.mode] = signal.getsignal(signal.SIGTERM)
    if config.mode == "evaluate":
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)    # the handler raises before this ends

  def notifier(*args):   # stands in for the handler that swallows it
    del args

  def run_modes(modes_to_run):
    for mode in modes_to_run:
      cli.user_errors_exit(lambda argv, mode=mode: modes.run(
          ml_collections.ConfigDict({"mode": mode}), str(tmp_path)))([])
      assert signal.getsignal(signal.SIGTERM) is notifier

  previous = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(modes, "resolve", lambda mode: fake_mode)
  monkeypatch.setattr(modes, "LOCKED", {})   # no workdir lock on 2 fake processes
  exits = []
  monkeypatch.setattr(cli.os, "_exit", exits.append)
  try:
    signal.signal(signal.SIGTERM, notifier)
    run_modes(("train", "sample", "pretokenize", "evaluate"))
    assert all(seen[m] is modes._stop_at_once for m in seen), seen
    assert exits == [143]
    err = capsys.readouterr().err   # what a rerun of that mode does
    assert err.startswith("Error: Stopped by SIGTERM. Nothing half-written")
    assert err.rstrip().endswith("run the same command again (evaluation "
                                 "starts over)."), err
    monkeypatch.setattr(modes.jax, "process_count", lambda: 2)
    run_modes(("train", "sample", "pretokenize"))
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert seen["train"] is seen["sample"] is notifier
  assert seen["pretokenize"] == signal.SIG_DFL


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_training_starts_up_says_no_step_ran(
    signum, tmp_path, monkeypatch, capsys):
  """A stop before the first step (data checks, tokenizer loading, init):
  SIGTERM ended the command with 143 and no word. Now one line for either
  signal, saying no step ran and what a rerun resumes from, with the
  signal's status; a workdir the run made is removed again."""
  from genvis_jax.core import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  exits = []
  monkeypatch.setattr(cli.os, "_exit", exits.append)
  c = demo.classifier_config()
  c.mode = "train"
  wd = tmp_path / "wd"
  if signum == signal.SIGTERM:   # a fresh run, stopped in its init
    def init_state(self):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)    # the handler raises before this ends
      raise AssertionError("SIGTERM did not stop the start-up")

    monkeypatch.setattr(trainer_lib.Trainer, "init_state", init_state)
    resume = "no checkpoint is saved yet: training starts again from step 0"
  else:   # Ctrl-C (Python's KeyboardInterrupt) in a run's data checks
    def create_train_iterator(*args, **kwargs):
      raise KeyboardInterrupt

    monkeypatch.setattr(trainer_lib, "create_train_iterator",
                        create_train_iterator)
    (wd / "checkpoints" / "3").mkdir(parents=True)   # a step saved before
    resume = "training resumes from step 3, its last saved checkpoint"

  def default_action(*args):   # stands in for SIG_DFL's silent exit 143
    raise AssertionError("SIGTERM reached the handler set before the run")

  previous = signal.signal(signal.SIGTERM, default_action)
  try:
    cli.user_errors_exit(lambda argv: modes.run(c, str(wd)))([])
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert exits == [128 + signum]
  by = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
  lines = [l for l in capsys.readouterr().err.splitlines()
           if l.startswith("Error:")]
  assert lines == [f"Error: Stopped by {by} before the first training step: "
                   f"this run saved no checkpoint; run the same command "
                   f"again ({resume})."]
  assert wd.exists() == (signum == signal.SIGINT)
  assert ckpt_lib.resume_note(str(wd / "checkpoints")) == resume


def test_an_error_on_several_processes_ends_the_process_at_once(monkeypatch,
                                                               capsys):
  """No wait at the distributed shutdown barrier: the message (or the
  traceback), then ``os._exit``."""
  exits = []
  monkeypatch.setattr(cli, "_distributed", lambda: True)
  monkeypatch.setattr(cli.os, "_exit", exits.append)

  def no_data(argv):
    raise DataNotFoundError("no images here")

  def bug(argv):
    raise ZeroDivisionError("a bug")

  def done(argv):
    sys.exit()

  def usage(argv):
    sys.exit("usage: ...")

  def ctrl_c(argv):
    raise KeyboardInterrupt

  def saved_stop(argv):   # training after saving the step in flight
    from genvis_jax.core import preemption  # pylint: disable=import-outside-toplevel
    raise preemption.TrainingStopped("Training stopped by SIGTERM after step 3")

  for main in (no_data, bug, done, usage, ctrl_c, saved_stop):
    cli.user_errors_exit(main)([])
  assert exits == [1, 1, 0, 1, 130, 143]
  exits.pop()
  err = capsys.readouterr().err
  assert "Error: no images here" in err and "ZeroDivisionError: a bug" in err
  assert "usage: ..." in err
  assert "Error: Stopped by Ctrl-C. Nothing half-written" in err
  assert "Error: Training stopped by SIGTERM after step 3" in err
  assert "KeyboardInterrupt" not in err
  monkeypatch.setattr(cli, "_distributed", lambda: False)
  # A saved stop exits as the signal would (the saves have finished).
  with pytest.raises(SystemExit) as e:
    cli.user_errors_exit(saved_stop)([])
  assert e.value.code == 143
  # Ctrl-C ends a one-process run at once too: its interpreter shutdown
  # under a checkpoint save in flight crashed.
  cli.user_errors_exit(ctrl_c)([])
  assert exits == [1, 1, 0, 1, 130, 130]
  assert "Stopped by Ctrl-C" in capsys.readouterr().err
  # --verbose: the traceback too, and still no interpreter shutdown.
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  cli.user_errors_exit(ctrl_c)([])
  err = capsys.readouterr().err
  assert exits[-1] == 130 and len(exits) == 7
  assert "KeyboardInterrupt" in err and "Stopped by Ctrl-C" in err


def test_a_second_ctrl_c_in_training_ends_the_command_at_once(monkeypatch,
                                                             capsys):
  """From the command line the process ends in the handler (one line, 130):
  a KeyboardInterrupt unwound through a save in flight, whose threads logged
  its traceback. Elsewhere (a notebook) it raises KeyboardInterrupt."""
  import signal as signal_lib   # pylint: disable=import-outside-toplevel
  from genvis_jax.core import preemption   # pylint: disable=import-outside-toplevel
  exits = []
  monkeypatch.setattr(preemption.os, "_exit", exits.append)
  stop = preemption.StopRequest()
  stop._handle(signal_lib.SIGINT, None)     # first: stop after saving
  assert stop.signal == "SIGINT" and not exits
  with pytest.raises(KeyboardInterrupt):
    stop._handle(signal_lib.SIGINT, None)
  monkeypatch.setattr(preemption, "exit_on_second_interrupt", True)
  stop._handle(signal_lib.SIGINT, None)
  assert exits == [130]
  err = capsys.readouterr().err
  assert err.startswith("Error: Stopped by Ctrl-C.") and len(err.splitlines()) == 1
  # Training names the step a rerun resumes from (steps may be lost).
  stop = preemption.StopRequest(resumes=lambda: "training resumes from step 4")
  stop._handle(signal_lib.SIGINT, None)
  stop._handle(signal_lib.SIGINT, None)
  assert capsys.readouterr().err.endswith(
      "run the same command again (training resumes from step 4).\n")


def test_the_resume_note_names_the_last_finalized_step(tmp_path):
  from genvis_jax.core import checkpoint as ckpt_lib   # pylint: disable=import-outside-toplevel
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  assert ckpt.resume_note() == ("no checkpoint is saved yet: training starts "
                                "again from step 0")
  for step in (3, 6):
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()  # in flight
  assert ckpt.resume_note() == ("training resumes from step 6, its last "
                                "saved checkpoint")


def test_out_of_device_memory_is_one_line_naming_the_batch_settings(capsys):
  import jax.numpy as jnp

  def too_wide(argv):   # as an Equivariant sample 100,000 columns wide
    jnp.ones((1 << 42,), jnp.uint8).block_until_ready()

  with pytest.raises(SystemExit) as e:
    cli.user_errors_exit(too_wide)([])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("Error: Out of device memory: RESOURCE_EXHAUSTED: Out "
                        "of memory allocating 4398046511104 bytes")
  assert "config.sample.batch_size" in err and len(err.splitlines()) == 1
  with pytest.raises(ZeroDivisionError):    # other runtime errors pass through
    cli.user_errors_exit(lambda argv: 1 / 0)([])


def test_unknown_keys_are_named_by_their_override():
  """The whole override, wherever its unknown part is; a demo config's
  top-level key points at its stages."""
  argv = ["main", "--config=configs/rar_b.py", "--config.trian.num_steps=5"]
  assert cli.unknown_key_message(KeyError("'trian'"), argv).startswith(
      "Unknown config key --config.trian.num_steps: an override must name")
  argv = ["main", "--config=configs/demo_fqgan.py", "--config.mode=evaluate",
          "--config.evaluate.samples=x"]
  message = cli.unknown_key_message(KeyError("'evaluate'"), argv)
  assert message.startswith("Unknown config key --config.evaluate.samples")
  assert "A demo config runs stages: their settings are under " in message


def test_a_flag_error_keeps_the_message_raised_from_none():
  """``raise ... from None`` ends the chain: the config argument's message
  (naming the argument), not the int() error under it."""
  from configs import base   # pylint: disable=import-outside-toplevel
  try:
    try:
      base.parse_arg("batch=abc", batch=2048)
    except ValueError as inner:   # as absl wraps a config file's error
      raise RuntimeError("Error whilst parsing config file") from inner
  except RuntimeError as e:
    message = cli.flag_error_message(e)
  assert message.endswith("ValueError: Config argument 'batch=abc': batch "
                          "takes an int (default 2048).")


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
  rar = rar_b.get_config("runlocal")
  rar.tokenizer.dtype = "float16"
  checks.check_precision(rar)
  # Read only by that schedule, and checked with it (a division by zero).
  c.optimizer.update(dict(schedule="step_decay", decay_every=0, decay_rate=0.5))
  with pytest.raises(errors.ConfigError,
                     match=r"config.optimizer.decay_every=0 must be at least 1"):
    opt_lib.make_optimizer(c.optimizer, c.train)
  # Not a number (a string in a config file): named too, not a bare float().
  with pytest.raises(errors.ConfigError,
                     match=r"config.optimizer.lr='1e-4x' must be finite"):
    opt_lib.check_config(ml_collections.ConfigDict(dict(
        name="adamw", schedule="constant", lr="1e-4x")))


def test_indivisible_batch(tmp_path):
  c = demo.classifier_config()
  c.train.global_batch_size = 30      # 8 devices
  with pytest.raises(ValueError, match="Use a multiple of 8"):
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))


# --- the command line: one message, no traceback, non-zero exit -----------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["--config=configs/demo.py"]
CLASSIFIER = DEMO + ["--config.only=classifier"]


def _cli(args, verbose_env=False, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "XLA_FLAGS": xla_flags(8)}
  env.pop("GENVIS_VERBOSE", None)
  if verbose_env:
    env["GENVIS_VERBOSE"] = "1"
  return subprocess.run([sys.executable, "-m", "genvis_jax.main", *args],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=REPO, env=env)


@pytest.fixture(scope="module")
def bad_params_dir(tmp_path_factory):
  from genvis_jax.core.weights import save_params  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("ck") / "bad")
  save_params(path, {"dense": {"kernel": np.zeros((2, 3), np.float32)}})
  return path


CASES = {
    "no_workdir": (["--config=configs/rar_xl.py"],
                   "Missing required flag --workdir"),
    "no_config": ([], "Missing required flag --config"),
    "config_key": (DEMO + ["--config.stages.rar.train.num_step=3"],
                   "Unknown config key.*num_steps"),
    "config_value": (DEMO + ["--config.stages.rar.train.num_steps=abc"],
                     "num_steps=abc: invalid literal for int"),
    "config_arg": (["--config=configs/rar_b.py:bogus"],
                   "Unknown config argument 'bogus'"),
    # A misspelt flag where the config takes a precision first.
    "config_arg_precision": (["--config=configs/fqgan_dual_ds16.py:runlcoal"],
                             r"Unknown config argument 'runlcoal'; this config "
                             r"takes a precision \(bf16 or fp32\) and the flag "
                             r"runlocal"),
    "config_index": (["--config=configs/fqgan_dual_ds16.py",
                      "--config.teachers[1].path=x"],
                     r"--config.teachers\[1\].path indexes past the end of "
                     r"its list .*indices count from 0"),
    "demo_stage_alone": (["--config=configs/far_demo.py"],
                         r"config.data.path='\{workdir\}/fq_tokens/.*' holds "
                         r"\{workdir\}, which a demo config .*fills in .*"
                         r"or set --config.data.path"),
    "no_config_file": (["--config=configs/nothere.py"],
                       "configs/nothere.py.*does not exist in the current "
                       "directory .*: run from the repository root"),
    "no_data": (CLASSIFIER + [
        "--config.stages.classifier.data.source=image_folder",
        "--config.stages.classifier.data.path=/nowhere/images"],
                "Image folder '/nowhere/images' does not exist"),
    "indivisible_batch": (CLASSIFIER + [
        "--config.stages.classifier.train.global_batch_size=30"],
                          "does not divide across 8.*Use a multiple of 8"),
    "checkpoint_mismatch": (DEMO + [
        "--config.only=samples", "--config.stages.samples.sample.batch_size=8",
        "--config.stages.samples.init_from={bad}"],
                            r"does not match the configured model.*or point "
                            r"--config.stages.samples.init_from at weights of "
                            r"the configured model"),   # the demo's flag
    "no_tokenizer_checkpoint": (
        ["--config=configs/rar_b.py:runlocal", "--config.mode=pretokenize"],
        r"set --config.tokenizer.checkpoint=DIR"),
    "missing_init_from": (
        ["--config=configs/rar_b.py:runlocal", "--config.mode=sample",
         "--config.init_from=/nowhere/run"],
        r"No checkpoint at /nowhere/run \(--config.init_from\)"),
    # Raised while the model is built (in Flax's setup), named as a flag.
    "model_setting": (DEMO + [
        "--config.only=tokenizer",
        "--config.stages.tokenizer.model.code_dim=16"],
                      r"config.stages.tokenizer.model.code_dim \(16\) must "
                      r"equal config.stages.tokenizer.model.z_channels"),
    "unknown_model": (
        ["--config=configs/rar_b.py:runlocal", "--config.model.name=rar_b"],
        r"Unknown config.model.name='rar_b'.*choose one of .*'rar'"),
    "missing_inception": (
        ["--config=configs/rar_b.py:runlocal", "--config.mode=evaluate",
         "--config.evaluate.samples=/nowhere/s.npz",
         "--config.evaluate.reference=/nowhere/r.npz",
         "--config.evaluate.inception=/nowhere/inception.npz"],
        r"No Inception weights at '/nowhere/inception.npz'"),
    "evaluate_demo_kind": (
        ["--config=configs/far_b.py:dual,runlocal", "--config.mode=evaluate",
         "--config.evaluate.kind=class_score"],
        r"kind='class_score' scores samples with the demo's classifier.*"
        r"model is 'far'.*kind=generation"),
    "evaluate_generator_as_tokenizer": (
        ["--config=configs/rar_b.py:runlocal", "--config.mode=evaluate",
         "--config.evaluate.kind=tokenizer"],
        r"kind='tokenizer' evaluates config.model .* model is 'rar', not a "
        r"tokenizer. Evaluate its tokenizer 'maskgit_vqgan' .*"
        r"--config=configs/maskgit_vqgan.py:runlocal --config.mode=evaluate "
        r"--config.evaluate.checkpoint=DIR"),
    "evaluate_unset": (
        ["--config=configs/rar_b.py:runlocal", "--config.mode=evaluate"],
        r"config.evaluate.samples, config.evaluate.reference and "
        r"config.evaluate.inception are not set: .*: set "
        r"--config.evaluate.samples=RUN/samples.npz, .*; set "
        r"--config.evaluate.reference to ADM's reference batch .*; set "
        r"--config.evaluate.inception=ckpt/inception after `python -m "
        r"genvis_jax.convert --kind=inception "),
    # The one path left out is named with the command that makes it.
    "evaluate_inception_unset": (
        ["--config=configs/rar_b.py:runlocal", "--config.mode=evaluate",
         "--config.evaluate.samples=/nowhere/s.npz",
         "--config.evaluate.reference=/nowhere/r.npz"],
        r"config.evaluate.inception is not set: .*: set "
        r"--config.evaluate.inception=ckpt/inception after `python -m "
        r"genvis_jax.convert --kind=inception --src=pt_inception-2015-12-05-"
        r"6726825d.pth --dst=ckpt/inception` \(pytorch-fid.s weights; the "
        r"\.pth itself works too\)\.$"),
    "mesh_devices": (CLASSIFIER + [
        "--config.stages.classifier.mesh.shape.data=3",
        "--config.stages.classifier.mesh.shape.fsdp=-1"],
                     r"the fixed axes \(3\) do not divide the 8 devices"),
    "checkpoint_every_zero": (CLASSIFIER + [
        "--config.stages.classifier.train.checkpoint_every=0"],
                              r"checkpoint_every=0 must be at least 1"),
    "negative_lr": (["--config=configs/rar_b.py:runlocal",
                     "--config.optimizer.lr=-1"],
                    r"config.optimizer.lr=-1.0 must be finite and >= 0"),
    "float16_training": (["--config=configs/rar_b.py:runlocal",
                          "--config.model.dtype=float16"],
                         r"config.model.dtype='float16': training has no "
                         r"loss scaling"),
    "workdir_is_a_file": (CLASSIFIER + ["--workdir={file}"],
                          r"--workdir=.*afile cannot be used as a directory"),
    "demo_config_other_mode": (DEMO + ["--config.mode=sample"],
                               r"config.mode=sample runs one job's config, "
                               r"and this is a demo config \(stages: "
                               r"tokenizer, .*--config.only=NAME.* e.g. "
                               r"configs/rar_b.py:runlocal\.$"),
    "sample_a_tokenizer": (
        ["--config=configs/eq_tokenizer.py:runlocal", "--config.mode=sample"],
        r"config.mode=sample draws from a generator, and config.model.name="
        r"'eq_tokenizer' is not one \(generators: eq_generator, far, rar\)"),
    "eq_demo_config_other_mode": (
        ["--config=configs/demo_eq.py", "--config.mode=sample"],
        r"demo config \(stages: eq_tokenizer, .* configs/eq_s.py:runlocal\.$"),
    "codebook_larger_than_tokenizer": (
        ["--config=configs/rar_b.py:runlocal", "--config.mode=sample",
         "--config.model.codebook_size=512"],
        r"config.model.codebook_size=512 is larger than the tokenizer's "
        r"config.tokenizer.model.num_codes=256: .*\(its config: "
        r"configs/maskgit_vqgan.py:runlocal\)"),
    "no_pretokenize_stage": (
        ["--config=configs/eq_s.py:runlocal", "--config.mode=pretokenize"],
        r"This config has no pretokenize stage"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_user_errors_print_one_message(name, tmp_path, bad_params_dir):
  args, pattern = CASES[name]
  (tmp_path / "afile").write_text("not a directory")
  args = [a.replace("{bad}", bad_params_dir).replace(
      "{file}", str(tmp_path / "afile")) for a in args]
  if name != "no_workdir" and not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={tmp_path / 'wd'}")
  out = _cli(args)
  assert out.returncode not in (0, None), out.stderr
  assert "Traceback" not in out.stdout + out.stderr, out.stderr
  err = out.stderr
  assert "Error: " in err and re.search(pattern, err, re.S), err
  # The error is the last thing printed: no log line or config dump after it.
  tail = err[err.rindex("Error: "):]
  assert not re.search(r"^[IWEF]\d{4} ", tail, re.M), err
  assert "global_batch_size:" not in err     # the config is not dumped


def test_cli_verbose_keeps_the_traceback(tmp_path):
  args, pattern = CASES["no_data"]
  out = _cli(args + [f"--workdir={tmp_path}", "--verbose"])
  assert out.returncode != 0
  assert "Traceback" in out.stderr and "DataNotFoundError" in out.stderr
  out = _cli(["--config=configs/rar_xl.py"], verbose_env=True)
  assert out.returncode != 0 and "Traceback" in out.stderr


def test_help_lists_the_runnable_configs_and_their_arguments():
  out = _cli(["--help"])   # absl's --help exits 1
  assert "Error" not in out.stderr, out.stderr
  listed = re.findall(r"^  (\w+\.py) ", out.stdout, re.M)
  runnable = sorted(n for n in os.listdir(os.path.join(REPO, "configs"))
                    if re.fullmatch(r"(rar|far|eq|fqgan|vq|maskgit|demo)\w*\.py",
                                    n) and not n.endswith("_common.py"))
  assert listed == runnable
  assert "rar_xl.py              RAR-XL on ImageNet 256" in out.stdout
  assert "runlocal" in out.stdout and "far_b.py:dual" in out.stdout
  assert "--[no]verbose: Show Python tracebacks" in out.stdout
  out = subprocess.run([sys.executable, "-m", "genvis_jax.convert", "--help"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert "Kinds here: clip_vision, dinov2, eq_generator," in out.stdout


def test_a_config_argument_error_gives_an_example_for_that_file(tmp_path):
  out = _cli(["--config=configs/demo.py:runlocal", f"--workdir={tmp_path}/w"])
  assert out.returncode == 2
  assert ("Unknown config argument 'runlocal'; this config takes smoke (a "
          "flag), comma-separated (e.g. --config=configs/demo.py:smoke)"
          in out.stderr), out.stderr
  assert not os.path.exists(tmp_path / "w")


def test_demo_mode_and_job_configs_are_not_mixed():
  from configs import rar_b   # pylint: disable=import-outside-toplevel
  job = rar_b.get_config()
  job.mode = "demo"
  with pytest.raises(UserError, match=r"mode=demo runs a demo config.*"
                     r"configs/demo.py"):
    modes.check_names(job)
  runner = demo.get_config()
  for mode in ("train", "evaluate"):
    runner.mode = mode
    with pytest.raises(UserError, match=f"config.mode={mode} runs one job"):
      modes.check_names(runner)
  runner.mode = "demo"
  modes.check_names(runner)
  # The shared defaults alone: no model to train (a traceback before).
  from configs import base   # pylint: disable=import-outside-toplevel
  for mode in ("train", "sample"):
    defaults = base.get_config()
    defaults.mode = mode
    with pytest.raises(UserError, match=rf"config.mode={mode} needs a model.*"
                       r"configs/base.py holds the defaults"):
      modes.check_names(defaults)
  defaults.mode = "pretokenize"    # a pre-tokenizing stage has no model
  modes.check_names(defaults)


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
