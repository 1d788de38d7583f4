"""Signals and errors outside the training loop's own stops end a run with
one line and lose no data: SIGTERM / Ctrl-C at any point, an error on
several processes, out-of-device-memory, a failed run's workdir."""

import logging
import os
import signal
import sys
import time

import ml_collections
import pytest

from configs import demo
from genvis_jax import cli
from genvis_jax import errors
from genvis_jax import modes
from genvis_jax.data import DataNotFoundError
from genvis_jax.train import trainer as trainer_lib


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
  monkeypatch.setattr(modes, "check_names", lambda config: None)   # no model
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_start_up_stop_raised_where_python_only_prints_it_still_stops(
    signum, tmp_path, monkeypatch, sigint_default):
  """Ctrl-C landing in jax's garbage-collection hook ("Exception ignored
  in: <function _xla_gc_callback>") was lost: the run trained to the end.
  The start-up notes the signal and stops before the first step."""
  c = demo.classifier_config()
  c.mode = "train"
  init_state = trainer_lib.Trainer.init_state

  def swallowed(self):
    try:   # as a callback whose errors Python only prints
      os.kill(os.getpid(), signum)
      time.sleep(5)
    except BaseException:  # pylint: disable=broad-except
      pass
    return init_state(self)

  monkeypatch.setattr(trainer_lib.Trainer, "init_state", swallowed)
  monkeypatch.setattr(trainer_lib.Trainer, "step", lambda *a: (
      pytest.fail("a step ran after the stop")))
  with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT
                     else errors.StoppedBySignal) as e:
    modes.run(c, str(tmp_path / "wd"))
  assert e.value.what.startswith("before the first training step")
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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


def test_the_command_line_sets_a_second_ctrl_c_to_end_the_process(
    tmp_path, monkeypatch):
  """``genvis_jax.main`` turns the exit above on before its mode runs (the
  tests above set it themselves); an import of the module leaves it off, as
  a notebook's second Ctrl-C raises."""
  from genvis_jax import main as main_lib   # pylint: disable=import-outside-toplevel
  from genvis_jax.core import preemption   # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(preemption, "exit_on_second_interrupt", False)
  assert not preemption.exit_on_second_interrupt
  seen = []
  monkeypatch.setattr(modes, "run", lambda config, workdir: seen.append(
      (config.mode, workdir, preemption.exit_on_second_interrupt)))
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  main_lib.FLAGS(["main", "--config=configs/demo.py:smoke",
                  f"--workdir={tmp_path}"])
  try:
    main_lib.main(["main"])
  finally:
    main_lib.FLAGS.unparse_flags()
    # Resetting --verbosity sets absl's logger to WARNING, which hid the
    # INFO lines that later tests in this process read with caplog.
    absl_logger.setLevel(level)
  assert seen == [("demo", str(tmp_path), True)]


def test_the_resume_note_names_the_last_finalized_step(tmp_path, monkeypatch):
  from genvis_jax.core import checkpoint as ckpt_lib   # pylint: disable=import-outside-toplevel
  from genvis_jax.core import preemption   # pylint: disable=import-outside-toplevel
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  assert ckpt.resume_note() == ("no checkpoint is saved yet: training starts "
                                "again from step 0")
  for step in (3, 6):
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()  # in flight
  assert ckpt.resume_note() == ("training resumes from step 6, its last "
                                "saved checkpoint")
  # A save in flight may still complete (a notebook's Ctrl-C said step 0
  # and the rerun resumed from the step being saved).
  assert ckpt_lib.resume_note(str(tmp_path / "checkpoints"), pending=9) == (
      "training resumes from step 6, its last saved checkpoint (from step 9 "
      "if its save, still being written, completes)")
  assert ckpt_lib.resume_note(str(tmp_path / "none"), pending=2).endswith(
      "from step 0 (from step 2 if its save, still being written, completes)")
  # Where a second Ctrl-C ends the process (the command line), the save in
  # flight ends with it.
  ckpt._pending = 9   # pylint: disable=protected-access
  assert "step 9" in ckpt.resume_note()
  monkeypatch.setattr(preemption, "exit_on_second_interrupt", True)
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


def test_a_ctrl_c_while_the_command_imports_is_not_lost(tmp_path,
                                                        sigint_default):
  """Ctrl-C during ``python -m genvis_jax.main``'s imports (here: as jax is
  imported) ends it at once with one line and nothing written; raised in
  jax's garbage-collection hook, its KeyboardInterrupt was only printed and
  the run trained to the end. After ``main`` starts, an interrupt whose
  exception is lost that way is raised where the start-up ends."""
  import subprocess   # pylint: disable=import-outside-toplevel
  import textwrap   # pylint: disable=import-outside-toplevel
  del sigint_default   # the child's SIGINT as a terminal's (not ignored)
  wd = tmp_path / "wd"
  code = textwrap.dedent(f"""
      import importlib.abc, os, runpy, signal, sys
      class CtrlC(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name == "jax":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
          return None
      sys.meta_path.insert(0, CtrlC())
      sys.argv = ["main", "--config=configs/demo.py:smoke", "--workdir={wd}"]
      runpy.run_module("genvis_jax.main", run_name="__main__")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=300, cwd=os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 130, out.stderr[-3000:]
  assert out.stderr.endswith("Error: Stopped by Ctrl-C while starting up; "
                             "nothing was written.\n"), out.stderr[-3000:]
  assert not wd.exists()
  lost = textwrap.dedent("""
      import signal
      from genvis_jax.core import interrupts, preemption
      signal.signal(signal.SIGINT, signal.default_int_handler)
      interrupts.note()
      interrupts.started()
      class Collected:
        def __del__(self):
          signal.raise_signal(signal.SIGINT)
      Collected()   # the KeyboardInterrupt is printed and lost here
      try:
        with preemption.NotedSignals() as noted:
          noted.raise_noted()
      except KeyboardInterrupt:
        print("raised")
  """)
  out = subprocess.run([sys.executable, "-c", lost], capture_output=True,
                       text=True, timeout=300)
  assert "Exception ignored" in out.stderr and out.stdout == "raised\n", out


def test_stop_request_puts_the_handlers_back():
  """After a training call in a notebook, Ctrl-C raises again (the mode's
  runner restores SIGTERM only)."""
  from genvis_jax.core import preemption
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with preemption.StopRequest():
    assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
  assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_sigterm_still_waits_for_the_save(monkeypatch):
  """Only a second Ctrl-C stops at once; a repeated SIGTERM (kill sent
  twice, a supervisor's retry) does not drop the checkpoint in flight."""
  from genvis_jax.core import preemption
  monkeypatch.setattr(preemption, "exit_on_second_interrupt", False)
  with preemption.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)   # no KeyboardInterrupt
    assert stop.should_stop(0) and stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_an_ignored_sigint_stays_ignored():
  """A `cmd &` job from a script ignores SIGINT; a Ctrl-C meant for the
  foreground job does not stop it."""
  from genvis_jax.core import preemption
  old = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with preemption.StopRequest():
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, old)


def test_a_failing_resume_note_does_not_stop_the_stop():
  """``resumes()`` reads the checkpoint folder: its error (any) does not
  escape the signal handler mid-step and end the run unsaved."""
  from genvis_jax.core import preemption

  def resumes():
    raise OSError("checkpoint folder unreadable")
  with preemption.StopRequest(resumes=resumes) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop(3)
