"""Every process of a job resumes the same way: each step's outcome and
the input position are agreed through the collectives (faked here as a
second process's answers; tests/test_multihost.py runs two real ones), so
a step or position one process cannot use is skipped or redrawn by all, and
an error on one stops all instead of leaving the others waiting."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import multihost
from genvis_jax.core import step_walk
from genvis_jax.train import trainer as trainer_lib
from tests.small_run import config, copy_run


def _saved_with_data_seed(step_dir, seed):
  """Step 6's position as a run whose order was drawn with ``seed`` saves it
  (a run resumed once without its position keeps that seed)."""
  path = os.path.join(step_dir, "data", "process_0-of-1.json")
  with open(path) as f:
    saved = json.load(f)
  with open(path, "w") as f:
    json.dump({"data_seed": seed, "iterator": saved["iterator"]}, f)


# Process 1's answers to the agreement collectives (process 0 is this one,
# its saved seed 7; None: the same as this one's): (read failed -1 /
# position unfit 1, its saved seed's upper and lower 16 bits, building the
# iterator failed -1 / set_state unfit 1).
OTHER_PROCESS = {
    "cannot_read": (-1,),
    "unfit_position": (1,),
    "other_data_seed": (0, 1, None, 1),      # 7 + 2**16: only the upper half
    "cannot_build": (0, None, None, -1),
    "set_state_failed": (0, None, None, 1),
}


@pytest.mark.parametrize("case", sorted(OTHER_PROCESS))
def test_processes_agree_on_the_input_position(base_run, tmp_path, monkeypatch,
                                               caplog, case):
  """Every process reaches each collective of a resume, whatever it alone
  read: one that cannot read its position (storage) stops them all, with
  the data order unchanged, before any builds an iterator (building one
  holds a collective on token data: a process that skipped it hung the
  others); one whose position does not fit, or whose files hold another
  data seed, makes every process draw the order afresh."""
  wd = copy_run(base_run, tmp_path)
  _saved_with_data_seed(os.path.join(wd, "checkpoints", "6"), 7)
  # The first two agree that the data and the frozen weights opened on both,
  # the next two that step 6 reads and restores on both.
  answers, events = [None, None, None, None, *OTHER_PROCESS[case]], []

  def gather_ints(v):
    events.append("gather")
    other = answers.pop(0) if answers else None
    return np.array([v, v if other is None else other])

  build = trainer_lib.create_train_iterator
  monkeypatch.setattr(multihost, "gather_ints", gather_ints)
  monkeypatch.setattr(trainer_lib, "create_train_iterator", lambda *a, **k: (
      events.append("iterator"), build(*a, **k))[1])
  if case in ("cannot_read", "cannot_build"):
    said = {"cannot_read": "could not read their input position saved with "
                           "step 6",
            "cannot_build": "could not open their input pipeline in the data "
                            "order saved with step 6"}[case]
    with pytest.raises(multihost.OtherProcessError,
                       match=r"Processes \[1\] " + said):
      trainer_lib.train_and_evaluate(config(9), wd)
    # No iterator for seed 7 before the agreements that precede it.
    assert events == ["iterator", "gather", "gather", "gather", "gather",
                      "gather"] + (
        ["gather", "gather", "iterator", "gather"]
        if case == "cannot_build" else [])
    assert ckpt_lib.Checkpointer(wd).latest_step() == 6
    return
  with caplog.at_level(logging.WARNING):
    trainer_lib.train_and_evaluate(config(9), wd)
  said = {"unfit_position": "cannot be used on processes [1]",
          "other_data_seed": "holds another data seed than on other processes",
          "set_state_failed": "cannot be used on processes [1]"}[case]
  assert f"saved with step 6 {said}, so it cannot be restored" in caplog.text
  assert not answers                          # every collective was reached


def test_a_storage_error_reading_the_position_is_told_to_every_process(
    base_run, tmp_path, monkeypatch):
  """Any error reading this process's position (a bucket's 503 may come as
  the file system backend's own error type, not OSError) is told to the
  other processes (-1 in the agreement) before it is raised here."""
  wd = copy_run(base_run, tmp_path)
  told = []

  def unavailable(self, step, data_group=None):
    raise RuntimeError(f"503 reading step {step}'s position")

  monkeypatch.setattr(ckpt_lib.Checkpointer, "saved_position", unavailable)
  monkeypatch.setattr(multihost, "gather_ints",
                      lambda v: (told.append(v), np.array([v, 0]))[1])
  with pytest.raises(RuntimeError, match="503 reading step 6"):
    trainer_lib.train_and_evaluate(config(9), wd)
  # The data and frozen weights opened; step 6 read and restored; its
  # position not.
  assert told == [0, 0, 0, 0, -1]
  assert ckpt_lib.Checkpointer(wd).latest_step() == 6


def test_frozen_weights_one_process_cannot_read_stop_every_process(
    tmp_path, monkeypatch):
  """Process 1 failing to read its LPIPS / teacher files (second agreement,
  after the data's) stops this one too, before any checkpoint is read,
  instead of leaving it waiting in the next collective."""
  answers = [0, -1]
  monkeypatch.setattr(multihost, "gather_ints", lambda v: np.array(
      [v, answers.pop(0) if answers else v]))
  with pytest.raises(multihost.OtherProcessError,
                     match=r"Processes \[1\] could not read the frozen weights"):
    trainer_lib.train_and_evaluate(config(3), str(tmp_path / "wd"))
  assert not answers


@pytest.mark.parametrize("other", ["unreadable", "other_config"])
def test_processes_restore_the_same_step(base_run, tmp_path, monkeypatch,
                                         caplog, other):
  """A step that process 1 alone cannot read is skipped by every process
  (a process falling back alone restored another step than the others); one
  that process 1 finds saved with another config stops every process."""
  wd = copy_run(base_run, tmp_path)
  # Process 1: the data and frozen weights opened, then step 6.
  answers = [0, 0, 1 if other == "unreadable" else 2]

  def gather_ints(v):
    return np.array([v, answers.pop(0) if answers else v])

  monkeypatch.setattr(multihost, "gather_ints", gather_ints)
  if other == "other_config":
    with pytest.raises(multihost.OtherProcessError,
                       match=r"Processes \[1\] found that step 6 was saved "
                             r"with another config"):
      trainer_lib.train_and_evaluate(config(9), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
    return
  seen = []
  with caplog.at_level(logging.WARNING):
    trainer_lib.train_loop(config(9), wd, on_log=lambda s, _: seen.append(s))
  assert ("Checkpoint step 6 in {} cannot be restored (it cannot be read on "
          "processes [1]".format(os.path.join(wd, "checkpoints"))) in caplog.text
  assert os.path.isdir(os.path.join(wd, "checkpoints", "corrupt-6"))
  # Steps 4..9 redone from step 3 (that this equals an uninterrupted run:
  # test_reliability's damage cases).
  assert seen == [4, 6, 8, 9], seen


def test_first_readable_agrees_after_each_stage(monkeypatch, caplog, tmp_path):
  """Stage by stage: a step whose first stage (validation) fails on process
  1 is skipped before this process runs its second (a restore of
  gigabytes); the first step every stage passes on both is returned with
  the reasons of those skipped. A failure here is this process's reason."""
  answers = [1, 0, 0]        # process 1: step 6 check fails; step 3 passes
  monkeypatch.setattr(multihost, "gather_ints",
                      lambda v: np.array([v, answers.pop(0)]))
  ran = []

  def check(step, _):
    ran.append(("check", step))
    return step * 10

  def read(step, value):
    ran.append(("read", step))
    return value + 1

  with caplog.at_level(logging.WARNING):
    walk = step_walk.first_readable([6, 3], (check, read), tmp_path,
                                   "restored")
  assert walk == step_walk.Walk(3, 31, [
      (6, "it cannot be read on processes [1] (their logs say why)")])
  assert ran == [("check", 6), ("check", 3), ("read", 3)] and not answers
  assert (f"Checkpoint step 6 in {tmp_path} cannot be restored (it cannot be "
          "read on processes [1] (their logs say why)); trying the previous "
          "step.") in caplog.text

  def gone(step, _):
    raise FileNotFoundError(f"step {step} is gone")

  monkeypatch.setattr(multihost, "gather_ints", lambda v: np.array([v, 0]))
  with caplog.at_level(logging.WARNING):
    walk = step_walk.first_readable([3], (gone, read), tmp_path)
  assert walk == step_walk.Walk(None, None, [
      (3, "FileNotFoundError: step 3 is gone")])
  assert ("cannot be read (FileNotFoundError: step 3 is gone); no older step"
          in caplog.text)
  # The storage failing (here or on another process) is not damage: no older
  # step stands in for it.
  told = []
  monkeypatch.setattr(multihost, "gather_ints",
                      lambda v: (told.append(v), np.array([v, 0]))[1])

  def unavailable(step, _):
    raise OSError(f"503 reading step {step}")

  with pytest.raises(step_walk.CheckpointStorageError, match="step 6 in"):
    step_walk.first_readable([6, 3], (unavailable, read), tmp_path)
  assert told == [3]
  monkeypatch.setattr(multihost, "gather_ints", lambda v: np.array([v, 3]))
  with pytest.raises(multihost.OtherProcessError,
                     match=r"Processes \[1\] could not read checkpoint step 6 "
                           r"from the storage"):
    step_walk.first_readable([6, 3], (check, read), tmp_path)


def test_first_readable_stops_at_another_config(monkeypatch, tmp_path):
  """A checkpoint of another config is not damage: no older step is tried,
  and the process that found it tells the others (code 2) before raising."""
  told = []
  monkeypatch.setattr(multihost, "gather_ints",
                      lambda v: (told.append(v), np.array([v, 0]))[1])

  def other_model(step, _):
    raise ckpt_lib.CheckpointMismatchError(f"step {step}: another model")

  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="step 6"):
    step_walk.first_readable([6, 3], (other_model,), tmp_path)
  assert told == [2]
  monkeypatch.setattr(multihost, "gather_ints", lambda v: np.array([v, 2]))
  with pytest.raises(multihost.OtherProcessError,
                     match=r"Processes \[1\] found that step 6 was saved "
                           "with another config"):
    step_walk.first_readable([6, 3], (lambda s, _: s,), tmp_path)


def test_processes_agree_on_a_background_save(monkeypatch, tmp_path):
  """On several processes a save in flight counts as ended once it has on
  every one, and a failure on any stops all at the same step: one process
  leaving alone would leave the others waiting in the next step."""
  from etils import epath  # pylint: disable=import-outside-toplevel

  class Manager:
    writing, failure = False, None

    def is_saving_in_progress(self):
      return self.writing

    def wait_until_finished(self):
      if self.failure:
        raise self.failure

    def all_steps(self):
      return [3]

  ckpt = object.__new__(ckpt_lib.Checkpointer)
  ckpt.manager, ckpt.directory = Manager(), epath.Path(tmp_path)
  (tmp_path / "6").mkdir()
  told, others = [], []
  monkeypatch.setattr(ckpt_lib.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost, "gather_ints", lambda v: (
      told.append(v), np.array([v, others.pop(0)]))[1])
  ckpt._pending, others[:] = 6, [0]            # process 1 is still writing
  ckpt.check(at_step=7, agree=True)
  assert ckpt._pending == 6 and told == [1]
  others[:] = [1, -1]                          # ended; process 1's failed
  with pytest.raises(multihost.OtherProcessError,
                     match=r"Processes \[1\] could not save checkpoint step 6 "
                           r".*training stopped at step 8"):
    ckpt.check(at_step=8, agree=True)
  ckpt._pending, told[:], others[:] = 6, [], [1, 0]
  ckpt.manager.failure = OSError(28, "No space left on device")
  with pytest.raises(ckpt_lib.CheckpointSaveError, match="stopped at step 9"):
    ckpt.check(at_step=9, agree=True)
  assert told == [1, -1]                       # the others were told


def test_a_resume_on_a_changed_image_folder(tmp_path, caplog):
  """The listing of an image folder is saved with each input position. A
  resume after images were added draws the order afresh (the saved position
  would repeat and skip images of the epoch in progress), and one after a
  class folder was added before others is refused: every later class's label
  moved, and the run went on training on the new labels without a word."""
  from PIL import Image   # pylint: disable=import-outside-toplevel
  from genvis_jax.errors import ConfigError   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)

  def add(cls, n, start=0):
    os.makedirs(tmp_path / "img" / cls, exist_ok=True)
    for i in range(start, start + n):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
          tmp_path / "img" / cls / f"{cls}{i}.png")

  for cls in ("cat", "dog", "emu"):
    add(cls, 8)
  wd = str(tmp_path / "wd")

  def train(steps):
    c = config(steps)
    c.data.update(source="image_folder", path=str(tmp_path / "img"),
                  random_crop=False, read_threads=1)
    c.model.num_classes = c.data.num_classes = 4
    c.train.update(profile_steps=0, ema_decay=0.0)
    return trainer_lib.train_and_evaluate(c, wd)

  train(3)
  with open(os.path.join(wd, "checkpoints", "3", "data",
                         "process_0-of-1.json")) as f:
    listing = json.load(f)["data_listing"]
  assert listing["count"] == 24 and listing["classes"] == ["cat", "dog", "emu"]
  add("dog", 4, start=8)
  with caplog.at_level(logging.WARNING):
    assert int(train(6).step) == 6
  assert any("counts examples of another listing of the image folder" in
             r.getMessage() and "(24 images then, 28 now" in r.getMessage()
             for r in caplog.records), caplog.text
  add("bird", 2)
  # Checked on another process count too (the position itself is unusable
  # there): step 6's position as two processes write it.
  data = os.path.join(wd, "checkpoints", "6", "data")
  for i in range(2):
    shutil.copy(os.path.join(data, "process_0-of-1.json"),
                os.path.join(data, f"process_{i}-of-2.json"))
  os.remove(os.path.join(data, "process_0-of-1.json"))
  with pytest.raises(ConfigError, match=r"class folders of the image folder "
                     r".* changed since step 6 was saved \(added: bird; "
                     r"removed: none\).* 3 class\(es\) now have other labels "
                     r"\('cat' 0 -> 1, 'dog' 1 -> 2, 'emu' 2 -> 3\)"):
    train(9)
  # The last class removed, or one renamed in its place, moves no label:
  # the order is drawn afresh, naming them.
  from genvis_jax.train import resume   # pylint: disable=import-outside-toplevel
  for classes, said in ((["cat", "dog"], "added: none; removed: emu"),
                        (["cat", "dogs", "emu"], "added: dogs; removed: dog")):
    why = resume.listing_changed(listing, {**listing, "classes": classes}, 3,
                                 "img")
    assert why.endswith(f"since; class folders {said})"), why


@pytest.mark.parametrize("exc", [OSError, RuntimeError, KeyError])
def test_run_everywhere_tells_the_others_of_any_error(monkeypatch, exc):
  """Whatever ``fn`` raises, this process joins the gather first (as -1),
  so the other processes raise instead of waiting ~100 s for a heartbeat."""
  sent = []
  monkeypatch.setattr(multihost, "gather_ints",
                      lambda v: sent.append(v) or np.array([v, 0]))

  def fn():
    raise exc("cannot read")
  with pytest.raises(exc):
    multihost.run_everywhere(fn, "could not read")
  assert sent == [-1]
