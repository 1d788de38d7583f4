"""Reliability of the real training loop: damaged checkpoints fall back to the
previous step (then match an uninterrupted run bit for bit), an input position
saved by another process count or pipeline is drawn afresh (the state still
resumes), and loading weights from a damaged run skips the damaged steps; a
save cut short by a kill is removed. (Failed and overlapping saves:
test_saves.py; processes agreeing on all this: test_resume_agreement.py;
divergence and errors: test_stops.py.)"""

import collections
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from genvis_jax import models
from genvis_jax.errors import UserError
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import step_walk
from genvis_jax.core import weights as weights_lib
from genvis_jax.train import resume as resume_lib
from genvis_jax.train import trainer as trainer_lib
from tests.small_run import config, copy_run, leaves, truncate_data_files


DAMAGES = {
    "truncated_ocdbt_file": truncate_data_files,
    "no_state_metadata": lambda s: os.remove(os.path.join(s, "state", "_METADATA")),
    "empty_iterator_json": lambda s: open(
        os.path.join(s, "data", "process_0-of-1.json"), "w").close(),
    "no_iterator_json": lambda s: os.remove(
        os.path.join(s, "data", "process_0-of-1.json")),
    "no_state_dir": lambda s: shutil.rmtree(os.path.join(s, "state")),
    # An item the step lists gone (a copy that stopped): it resumed as if
    # never saved, the data order drawn afresh, while step 3 had it.
    "no_data_dir": lambda s: shutil.rmtree(os.path.join(s, "data")),
    "no_config_dir": lambda s: shutil.rmtree(os.path.join(s, "config")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_checkpoint_falls_back(runs, tmp_path, caplog, damage):
  full, base = runs
  wd = copy_run(base, tmp_path)
  DAMAGES[damage](os.path.join(wd, "checkpoints", "6"))
  with caplog.at_level(logging.WARNING):
    resumed = trainer_lib.train_and_evaluate(config(9), wd)
  warnings = [r.getMessage() for r in caplog.records
              if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and "step 6" in warnings[0], warnings
  # Moved aside, not deleted; training redid steps 4..9 from step 3 and
  # saved step 6 again (Orbax skips a step it still lists).
  assert os.path.isdir(os.path.join(wd, "checkpoints", "corrupt-6"))
  assert "outside config.train.keep_checkpoints (nothing deletes it" in (
      caplog.text)   # a whole checkpoint's size, for good
  assert ckpt_lib.Checkpointer(wd).manager.all_steps() == [3, 6, 9]
  for a, b in zip(full, leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_a_storage_error_on_resume_moves_nothing(runs, tmp_path, monkeypatch):
  """A transient storage failure (a GCS 503) reading the newest step is not
  damage: the run stops, naming it, with every step in place (it was moved
  aside and an older step resumed, losing checkpoint_every steps); the
  same command then resumes from the newest step."""
  _, base = runs
  wd = copy_run(base, tmp_path)
  real, calls = ckpt_files.validate_step, []

  def unavailable_once(step_dir, **kwargs):
    calls.append(step_dir.name)
    if len(calls) == 1:
      raise ValueError(f"{step_dir.name}/state/d/abc is unreadable "
                       "(UNAVAILABLE: 503 Service Unavailable)")
    return real(step_dir, **kwargs)

  monkeypatch.setattr(ckpt_files, "validate_step", unavailable_once)
  with pytest.raises(step_walk.CheckpointStorageError,
                     match=r"Reading checkpoint step 6 in .*checkpoints failed "
                           r"in the storage \(ValueError: 6/state/d/abc is "
                           r"unreadable \(UNAVAILABLE.*nothing was skipped or "
                           r"moved. Run the same command again"):
    trainer_lib.train_and_evaluate(config(9), wd)
  assert calls == ["6"]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
  resumed = trainer_lib.train_loop(config(7), wd)
  assert int(resumed.step) == 7 and calls == ["6", "6"]


@pytest.fixture
def checked_keys(monkeypatch):
  """The OCDBT keys ``check_ocdbt`` reads, in order."""
  import types  # pylint: disable=import-outside-toplevel
  real_open, read = ckpt_files.ts.KvStore.open, []

  def recording_open(spec):
    kv = real_open(spec).result()
    wrapped = types.SimpleNamespace(
        list=kv.list, read=lambda k, **kw: (read.append(k), kv.read(k, **kw))[1])
    return types.SimpleNamespace(result=lambda: wrapped)

  monkeypatch.setattr(ckpt_files, "ts", types.SimpleNamespace(
      KvStore=types.SimpleNamespace(open=recording_open)))
  return read


def test_processes_split_the_checks_of_a_steps_arrays(runs, checked_keys):
  """Each of n processes reads every n-th value of the step's OCDBT database
  (the walk agrees their outcomes): together all, none twice."""
  _, base = runs
  read = checked_keys
  state = epath.Path(base) / "checkpoints" / "6" / "state"
  shares = []
  for share in ((0, 1), (0, 2), (1, 2)):
    read.clear()
    ckpt_files.check_ocdbt(state, share)
    shares.append(list(read))
  whole, first, second = shares
  assert len(whole) > 20 and not set(first) & set(second)
  assert sorted(first + second) == sorted(whole)


def test_a_weight_load_checks_the_weights_once_when_pinned_and_loaded(
    runs, checked_keys):
  """Sampling's start (pin a run's newest step, record its weights' source
  before and after loading them, load) checks each weight's values once when
  the step is pinned and once when it is loaded, and none of the optimizer
  state (about half a step's arrays), which a weight load does not read."""
  wd = runs[1]
  pinned = weights_lib.resolve_all([wd])[0]
  assert pinned.endswith(os.path.join("checkpoints", "6"))
  sources = [weights_lib.params_source(pinned)]
  models.load_params(config(1).model, pinned)
  sources.append(weights_lib.params_source(pinned))
  assert sources[0] == sources[1] and sources[0].startswith("step 6 committed")
  checked = collections.Counter(checked_keys)
  checked_keys.clear()
  ckpt_files.check_ocdbt(epath.Path(pinned) / "state")
  weights = {k for k in checked_keys if k.startswith((b"params.", b"ema."))}
  assert weights and len(weights) < len(checked_keys) / 1.5   # opt_state
  assert set(checked) == weights and set(checked.values()) == {2}


def test_a_save_cut_short_by_a_kill_is_removed_on_resume(runs, tmp_path,
                                                          caplog):
  """kill -9 (or a reclaimed VM) during the save of step 9 leaves its folder
  under Orbax's temporary name, a whole train state at paper size: the
  resumed run removes it, then saves step 9 itself."""
  full, base = runs
  wd = copy_run(base, tmp_path)
  left = os.path.join(wd, "checkpoints", "9.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(left, "state"))
  with open(os.path.join(left, "state", "d"), "wb") as f:
    f.write(b"\0" * 4096)
  with caplog.at_level(logging.WARNING):
    resumed = trainer_lib.train_and_evaluate(config(9), wd)
  # The resume says what it changed (the base run trained 6 steps).
  assert ("config differs from the checkpoint's; it continues with this run's "
          "values:\n  train.num_steps: checkpoint 6 vs this run 9") in caplog.text
  assert ("Removing the leftovers of unfinished saves (a run stopped while "
          "writing them): 9.orbax-checkpoint-tmp-1700000000") in caplog.text
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6", "9"]
  for a, b in zip(full, leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def _as_if_two_processes_wrote(step_dir):
  """Step 6's input position as a 2-process job saves it (one file each)."""
  data = os.path.join(step_dir, "data")
  os.rename(os.path.join(data, "process_0-of-1.json"),
            os.path.join(data, "process_0-of-2.json"))
  shutil.copy(os.path.join(data, "process_0-of-2.json"),
              os.path.join(data, "process_1-of-2.json"))


def _as_if_another_pipeline_wrote(step_dir):
  """Valid JSON of a state this pipeline's ``set_state`` refuses."""
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
    f.write('{"workers_state": {}, "iterations_to_skip": {}}')


def _with_another_worker_count(config):
  # Grain takes some such states and then yields other batches: the saved
  # config decides.
  config.data.num_workers = config.data.num_workers + 1
  return config


def _as_if_another_data_group_read(step_dir):
  """As if another mesh at the same process count had grouped the processes
  otherwise (sharding.data_groups): this one read another shard."""
  path = os.path.join(step_dir, "data", "process_0-of-1.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved["data_group"] == [0, 1]     # recorded by the run
  saved["data_group"] = [1, 2]
  with open(path, "w") as f:
    json.dump(saved, f)


SAVED_ELSEWHERE = {   # case: (damage to step 6, resume config, warning)
    "other_data_group": (_as_if_another_data_group_read, lambda c: c,
                         "was read as data group 1 of 2, and this run's mesh "
                         "makes this process group 0 of 1"),
    "other_process_count": (_as_if_two_processes_wrote, lambda c: c,
                            "was written by 2 process(es) and this job has 1"),
    "other_pipeline": (_as_if_another_pipeline_wrote, lambda c: c,
                       "does not fit this input pipeline (KeyError"),
    "other_num_workers": (lambda s: None, _with_another_worker_count,
                          "was saved with config.data.num_workers=0 and this "
                          "run has 1"),
}


@pytest.mark.parametrize("case", sorted(SAVED_ELSEWHERE))
def test_resume_with_unfitting_input_position_keeps_state(runs, tmp_path,
                                                          caplog, case):
  """A job resumed on a slice with another number of hosts, or with another
  input pipeline, restores the train state and draws a fresh data order
  (the saved positions do not map onto the new shards or pipeline). Before,
  it found every step "damaged" and could not resume at all."""
  full, base = runs
  wd = copy_run(base, tmp_path)
  change, configure, said = SAVED_ELSEWHERE[case]
  change(os.path.join(wd, "checkpoints", "6"))
  seen = []
  with caplog.at_level(logging.WARNING):
    resumed = trainer_lib.train_loop(configure(config(9)), wd,
                                     on_log=lambda s, _: seen.append(s))
  warnings = [r.getMessage() for r in caplog.records
              if "input position" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert f"saved with step 6 {said}" in warnings[0], warnings[0]
  assert seen == [8, 9], seen                       # resumed at step 6
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6", "9"]
  # Another data order after step 6 than the uninterrupted run's, drawn with
  # the seed from (config.seed, 6), which later checkpoints keep.
  assert any(not np.array_equal(a, b) for a, b in zip(full, leaves(resumed)))
  with open(os.path.join(wd, "checkpoints", "9", "data",
                         "process_0-of-1.json")) as f:
    assert json.load(f)["data_seed"] == resume_lib.resume_seed(0, 6)
  assert resume_lib.resume_seed(0, 6) != resume_lib.resume_seed(0, 3)


def test_resume_on_token_files_written_again_draws_afresh(runs, tmp_path,
                                                         caplog, monkeypatch):
  """Token files written again with the same tokenizer weights (centre crops
  for ten crops, images added): the saved position counts in the old files,
  so the order is drawn afresh (``run_origin.files_changed`` says so)."""
  from genvis_jax.data import run_origin  # pylint: disable=import-outside-toplevel
  wd = copy_run(runs[1], tmp_path)
  monkeypatch.setattr(run_origin, "files_changed",
                      lambda c, w, s: "counts examples of other token files")
  made, create = [], trainer_lib.create_train_iterator
  monkeypatch.setattr(trainer_lib, "create_train_iterator", lambda *a, **k: (
      made.append(create(*a, **k)) or made[-1]))
  with caplog.at_level(logging.WARNING):
    trainer_lib.train_loop(config(9), wd)
  assert any("saved with step 6 counts examples of other token files"
             in r.getMessage() for r in caplog.records)
  # The input it replaced and the one it trained on are closed (left to the
  # garbage collector, a closing iterator could deadlock the next one).
  assert len(made) == 2 and all(it._closed for it, _ in made)   # pylint: disable=protected-access


def test_order_drawn_afresh_survives_later_resumes(runs, tmp_path):
  """After a resume on another process count, resuming again (on the same
  count) continues the redrawn order: the same as not stopping at all."""
  straight = copy_run(runs[1], tmp_path)
  _as_if_two_processes_wrote(os.path.join(straight, "checkpoints", "6"))
  split = shutil.copytree(straight, str(tmp_path / "split"))
  want = trainer_lib.train_and_evaluate(config(12), straight)
  trainer_lib.train_and_evaluate(config(9), split)
  got = trainer_lib.train_and_evaluate(config(12), split)
  for a, b in zip(leaves(want), leaves(got)):
    np.testing.assert_array_equal(a, b)



def test_partial_iterator_states_are_damage(runs, tmp_path):
  wd = copy_run(runs[1], tmp_path)
  step_dir = os.path.join(wd, "checkpoints", "6")
  _as_if_two_processes_wrote(step_dir)
  assert ckpt_files.saved_process_count(epath.Path(step_dir)) == 2
  os.remove(os.path.join(step_dir, "data", "process_1-of-2.json"))
  with pytest.raises(ValueError, match="process_1-of-2.json is missing"):
    ckpt_files.validate_step(epath.Path(step_dir))
  shutil.copy(os.path.join(wd, "checkpoints", "3", "data", "process_0-of-1.json"),
              os.path.join(step_dir, "data"))
  with pytest.raises(ValueError, match="mixed"):
    ckpt_files.validate_step(epath.Path(step_dir))


def test_truncation_is_caught_before_orbax_reads(runs, tmp_path):
  wd = copy_run(runs[1], tmp_path)
  step_dir = epath.Path(wd) / "checkpoints" / "6"
  ckpt_files.validate_step(step_dir)  # intact: passes
  truncate_data_files(str(step_dir))
  with pytest.raises(ValueError, match="is unreadable.*OUT_OF_RANGE"):
    ckpt_files.validate_step(step_dir)
  # Data files gone (an interrupted copy): TensorStore reads empty values.
  step_3 = epath.Path(wd) / "checkpoints" / "3"
  ckpt_files.validate_step(step_3)
  shutil.rmtree(step_3 / "state" / "ocdbt.process_0")
  with pytest.raises(ValueError, match="is empty .*data file under state/ is missing"):
    ckpt_files.validate_step(step_3)


def test_no_loadable_checkpoint_lists_what_was_tried(runs, tmp_path):
  wd = copy_run(runs[1], tmp_path)
  for step in ("3", "6"):
    os.remove(os.path.join(wd, "checkpoints", step, "state", "_METADATA"))
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as e:
    trainer_lib.train_and_evaluate(config(9), wd)
  assert isinstance(e.value, UserError)
  msg = str(e.value)
  assert "step 6: ValueError: state/_METADATA is missing" in msg
  assert "step 3: ValueError: state/_METADATA is missing" in msg
  # Nothing is moved when nothing loads (it may be a config or code problem).
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]


def _state_of_step(wd, step):
  """The train state Orbax holds for ``step`` (restored directly)."""
  ckpt = ckpt_lib.Checkpointer(wd, async_save=False)
  meta = ckpt.manager.item_metadata(step)["state"]
  as_numpy = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=as_numpy)))
  return restored["state"]


def _ema_of_step(wd, step):
  return _state_of_step(wd, step)["ema"]


def test_init_groups_read_a_group_of_the_pinned_step(runs, tmp_path):
  """``restore_params(group=...)`` reads that group's parameters (not the
  EMA) of a run's step; a group the run lacks, a parameter checkpoint and
  a group the task lacks are refused by name."""
  wd = runs[1]
  state = _state_of_step(wd, 6)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["ema"])
  got = weights_lib.restore_params(wd, abstract, group="model")
  for a, b in zip(leaves(state["params"]["model"]), leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(leaves(state["ema"]), leaves(got)))   # not the EMA
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"Step 6 of .* has no 'disc' parameters \(its "
                           r"groups: \['model'\]\)"):
    weights_lib.restore_params(wd, abstract, group="disc")
  weights_lib.save_params(str(tmp_path / "converted"), state["ema"])
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"is a parameter checkpoint: .* not the 'disc' "
                           r"parameters of a training run.*leave 'disc' out "
                           r"of config.init_groups"):
    weights_lib.restore_params(str(tmp_path / "converted"), abstract,
                               group="disc")
  c = config(1)
  c.init_from, c.init_groups = wd, ("disc",)
  with pytest.raises(UserError, match=r"config.init_groups=\('disc',\) "
                     r"names \['disc'\].*other parameter groups are none"):
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))


def _cut_sharding_json(step_dir):
  path = os.path.join(step_dir, "state", "_sharding")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty_data_files(step_dir):
  truncate_data_files(step_dir, keep=0)


@pytest.mark.parametrize("damage", [_empty_data_files, _cut_sharding_json])
def test_inference_loading_skips_a_damaged_latest_step(runs, tmp_path, caplog,
                                                       damage):
  """Sampling / pretokenize / evaluate read a training workdir like a resume:
  the newest step that loads (here 3, step 6 damaged), files left in place."""
  wd = copy_run(runs[1], tmp_path)
  want = _ema_of_step(wd, 3)
  damage(os.path.join(wd, "checkpoints", "6"))
  model = config(1).model
  with caplog.at_level(logging.WARNING):
    got = models.load_params(model, wd, setting="--config.init_from")
  assert any("step 6" in r.getMessage() and "cannot be read" in r.getMessage()
             for r in caplog.records)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]


def test_inference_loading_errors_name_the_setting(runs, tmp_path, caplog):
  model = config(1).model
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match="--config.tokenizer.checkpoint=DIR"):
    models.load_params(model, "", setting="--config.tokenizer.checkpoint")
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"nowhere \(--config.init_from\)"):
    models.load_params(model, str(tmp_path / "nowhere"),
                               setting="--config.init_from")
  # An official weight file, not converted yet: the conversion is named.
  (tmp_path / "places_large.ckpt").write_bytes(b"\x80\x02")
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"places_large.ckpt is a file, not a folder of "
                           r"weights: .* genvis_jax.convert --kind=KIND "
                           r"--src=.*places_large.ckpt --dst=DIR"):
    models.load_params(model, str(tmp_path / "places_large.ckpt"),
                       setting="--config.init_from")
  # Weights of another size: the run's differing model settings are named.
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"does not match the configured model(.|\n)*The "
                           r"run was trained with other model settings:\n"
                           r"    model.widths: run \[8, 16\] vs config "
                           r"\[8, 24\]$"):
    models.load_params(ml_collections_copy(model, widths=(8, 24)), runs[1])
  other = ml_collections_copy(model, name="rar")
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match="training run of model 'classifier'; a checkpoint of model 'rar'"):
    weights_lib.restore_params(runs[1], None, setting="--config.init_from",
                         model_name=other.name)
  # A training run passed as the FID Inception: named as such, not as 500
  # missing keys.
  from genvis_jax.convert import inception
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"\(--config.evaluate.inception\) is a training "
                           "run of model 'classifier'; a checkpoint of model "
                           "'inception' is expected"):
    inception.load_inception_params(runs[1])
  for damage in ("3", "6"):
    _empty_data_files(os.path.join(_copy_once(runs[1], tmp_path),
                                     "checkpoints", damage))
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match="step 6.*\n.*step 3"):
    models.load_params(model, _copy_once(runs[1], tmp_path))
  # A step named (not walked to): its own error, no fallback, no warning
  # about older steps.
  named = os.path.join(_copy_once(runs[1], tmp_path), "checkpoints", "6")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    with pytest.raises(ckpt_lib.CheckpointRestoreError,
                       match=r"Checkpoint step 6 under .* cannot be read "
                             r"\(ValueError: .*\)\. Name another step"):
      models.load_params(model, named)
  assert "older step" not in caplog.text


def _copy_once(base, tmp_path):
  wd = tmp_path / "wd"
  return str(wd) if wd.exists() else copy_run(base, tmp_path)


def ml_collections_copy(cfg, **changes):
  c = cfg.copy_and_resolve_references()
  c.update(changes)
  return c


def test_a_finished_run_says_so(runs, tmp_path, caplog):
  wd = copy_run(runs[1], tmp_path)
  with caplog.at_level(logging.INFO):
    state = trainer_lib.train_and_evaluate(config(6), wd)
  assert int(state.step) == 6
  # What the steps amount to (a batch override keeps a recipe's steps):
  # the demo set's 10,000 images, 625 batches of 16.
  assert ("start step 6 of 6 (0.0096 epochs of 10000 examples at global "
          "batch 16)") in caplog.text
  assert "Training already finished" in caplog.text
  assert "holds step 6 of config.train.num_steps=6" in caplog.text
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
