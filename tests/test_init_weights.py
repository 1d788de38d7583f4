"""Weights loaded into a run from elsewhere: parameter checkpoints (named by
their content, damage refused before Orbax reads them) and a fresh run's
``--config.init_from`` (what does not fit is refused before the data are
opened, as the load words it; what fits trains on)."""

import os
import shutil
from unittest import mock

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.train import tasks
from genvis_jax.train import trainer as trainer_lib
from tests import compiles
from tests import small_run


def test_parameter_checkpoints_are_named_by_their_content(tmp_path):
  params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": {"c": np.ones(4, np.int32)}}
  x, y = str(tmp_path / "x"), str(tmp_path / "y")
  weights_lib.save_params(x, params)
  weights_lib.save_params(y, params)       # the same weights converted again
  source = weights_lib.params_source(x)
  assert source.startswith("params sha256 ") and len(source) == 14 + 64
  assert weights_lib.params_source(y) == source
  one_ulp = dict(params, a=params["a"].copy())
  one_ulp["a"][0, 0] = np.nextafter(np.float32(0), np.float32(1))
  weights_lib.save_params(y, one_ulp)      # replaced by other weights
  assert weights_lib.params_source(y) not in ("", source)
  # Loading checks the arrays against the digest: other arrays under it
  # (damaged or replaced files) are refused.
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  np.testing.assert_array_equal(
      weights_lib.restore_params(x, abstract)["a"], params["a"])
  shutil.copy(os.path.join(x, weights_lib.DIGEST_FILE),
              os.path.join(y, weights_lib.DIGEST_FILE))
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match=r"is damaged: its arrays do not match the SHA-256"):
    weights_lib.restore_params(y, abstract)
  # Written before digests were recorded: Orbax's commit time names them.
  os.remove(os.path.join(x, weights_lib.DIGEST_FILE))
  assert weights_lib.params_source(x).startswith("params committed 1")
  weights_lib.restore_params(x, abstract)


def test_a_cut_parameter_checkpoint_is_refused_before_orbax_reads_it(
    tmp_path, monkeypatch):
  """A parameter checkpoint whose data files were cut short, whose metadata
  or manifests are gone (an interrupted copy), whose save never finished,
  or that is a file, is refused with one error naming the damage and the
  fix (a TypeError or raw TensorStore / OS error from inside Orbax before,
  or "No checkpoint ... Check the path" for an interrupted save)."""
  params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
  x = str(tmp_path / "x")
  weights_lib.save_params(x, params)
  data = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(x, "params"))
          if os.path.basename(d) == "d" for f in files]
  assert data
  for f in data:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  abstract = {"a": jax.ShapeDtypeStruct((2, 3), np.float32)}
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match=r"Parameter checkpoint .*x is damaged: .*"
                           r"x/params/d/.*Convert \(or copy\) the weights"):
    weights_lib.restore_params(x, abstract)
  weights_lib.save_params(x, params)
  os.remove(os.path.join(x, "params", "_METADATA"))
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match="is damaged: params/_METADATA is missing"):
    weights_lib.restore_params(x, abstract)
  # A partial copy without the database's manifests: named, not _METADATA.
  weights_lib.save_params(x, params)
  os.remove(os.path.join(x, "params", "manifest.ocdbt"))
  shutil.rmtree(os.path.join(x, "params", "ocdbt.process_0"))
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match="is damaged: params/manifest.ocdbt is missing"):
    weights_lib.restore_params(x, abstract)
  # A save Orbax never finalized: written in place (as on GCS, where only
  # a missing commit_success.txt tells), or interrupted before the rename
  # (local disk: only the temporary folder is there).
  weights_lib.save_params(x, params)
  with monkeypatch.context() as m:
    m.setattr(ocp.step, "is_path_finalized", lambda p: False)
    with pytest.raises(ckpt_lib.CheckpointRestoreError,
                       match="is damaged: its save did not finish"):
      weights_lib.restore_params(x, abstract)
  os.rename(os.path.join(x, "params"),
            os.path.join(x, "params.orbax-checkpoint-tmp-1700000000"))
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"params.orbax-checkpoint-tmp-1700000000 is a save "
                           r"of these weights that has not finished.*convert "
                           r"\(or copy\) the weights again"):
    weights_lib.restore_params(x, abstract)
  shutil.rmtree(os.path.join(x, "params.orbax-checkpoint-tmp-1700000000"))
  open(os.path.join(x, "params"), "w").close()     # not even a folder
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match="is damaged|cannot be read"):
    weights_lib.restore_params(x, abstract)


def test_init_from_lists_missing_unexpected_and_misshaped_keys(tmp_path):
  tr = trainer_lib.Trainer(small_run.config(1))
  params = jax.device_get(tr.init_state().params["model"])
  params = dict(params)
  params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  del params["head"]
  params["conv_0"] = dict(params["conv_0"], kernel=np.zeros((3, 3, 3, 4), np.float32))
  weights_lib.save_params(str(tmp_path / "bad"), params)
  c = small_run.config(1)
  c.init_from = str(tmp_path / "bad")
  # Refused before the data are opened (it was once the state was built).
  with mock.patch.object(trainer_lib, "create_train_iterator",
                         side_effect=AssertionError("the data were opened")):
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
      trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))
  msg = str(e.value)
  # The sizes lead (another model size shows there at once).
  sizes = [f"{sum(x.size for x in jax.tree_util.tree_leaves(p)):,} parameters "
           f"in {len(jax.tree_util.tree_leaves(p))} arrays"
           for p in (params, tr.init_state().params["model"])]
  assert (f"does not match the configured model: it holds {sizes[0]}, the "
          f"model {sizes[1]}.\n" in msg)
  assert "missing (2): head/bias, head/kernel" in msg
  assert "unexpected (1): extra/kernel" in msg
  assert "conv_0/kernel expected (3, 3, 3, 8) found (3, 3, 3, 4)" in msg
  assert not os.path.exists(tmp_path / "wd" / "checkpoints" / "1")


def test_init_from_trains_from_the_loaded_weights(base_run, tmp_path, caplog):
  """A fresh run from another run's weights (EMA on): the model and its EMA
  start from that run's EMA parameters. (The EMA was the same buffers as
  the parameters, donated twice by the first step: the process crashed.)
  The EMA's copy compiles nothing (a copy per leaf compiled a program per
  distinct shape: 36 for the Equivariant tokenizer's stage 2)."""
  c = small_run.config(1, lr=0.0)   # the step leaves the weights as loaded
  c.init_from = base_run
  with compiles.compiled(caplog) as programs:
    state = trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))
  assert "jit(copy)" not in programs, programs
  want = weights_lib.restore_params(base_run, state.ema)   # its step 6's EMA
  assert int(state.step) == 1
  for a, b, e in zip(small_run.leaves(want),
                     small_run.leaves(state.params["model"]),
                     small_run.leaves(state.ema)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(e, a, rtol=1e-6)   # 0.9 a + 0.1 a, rounded
  # A run of another model is refused before the data are opened (it was
  # after the state was built: minutes on a pod).
  from configs import demo  # pylint: disable=import-outside-toplevel
  other = demo.tokenizer_config()
  other.init_from = base_run
  with mock.patch.object(trainer_lib, "create_train_iterator",
                         side_effect=AssertionError("the data were opened")):
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"\(--config.init_from\) is a training run of model "
                             r"'classifier'; a checkpoint of model "):
      trainer_lib.train_and_evaluate(other, str(tmp_path / "other"))
  assert not os.path.exists(tmp_path / "other")
  # So is a run of this model at another size, as the load would word it.
  wider = small_run.config(1)
  wider.model.widths = (8, 24)
  wider.init_from = base_run
  with mock.patch.object(trainer_lib, "create_train_iterator",
                         side_effect=AssertionError("the data were opened")):
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"step 6 \(--config.init_from\) does not match the "
                             r"configured model(.|\n)*expected \(3, 3, 8, 24\) "
                             r"found \(3, 3, 8, 16\)(.|\n)*model\.widths") as e:
      trainer_lib.train_and_evaluate(wider, str(tmp_path / "wider"))
  assert not os.path.exists(tmp_path / "wider")
  abstract = nn.unbox(jax.eval_shape(
      tasks.get_task(wider).init_params, jax.random.key(0)))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as loaded:
    weights_lib.restore_params(base_run, abstract["model"],
                               setting="--config.init_from",
                               model_config=wider.model)
  assert str(loaded.value) == str(e.value)
  # And each of init_groups, as its load would.
  fits = nn.unbox(jax.eval_shape(tasks.get_task(small_run.config(1)).init_params,
                                 jax.random.key(0)))
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"^Step 6 of .* has no 'disc' parameters"):
    weights_lib.check_source(base_run, "--config.init_from", ("disc",),
                             abstract_params={**fits, "disc": {}})
  # A named step that is damaged is the load's to name, not a misfit.
  named = str(tmp_path / "named")
  shutil.copytree(base_run, named)
  small_run.truncate_data_files(os.path.join(named, "checkpoints", "6"), keep=0)
  weights_lib.check_source(os.path.join(named, "checkpoints", "6"),
                           "--config.init_from", abstract_params=abstract)
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match=r"step 6 .* cannot "
                     r"be read"):
    weights_lib.restore_params(os.path.join(named, "checkpoints", "6"),
                               abstract["model"])
  # The check reads the step the load would: with step 6's saved config cut
  # (the load falls back to step 3), step 3's, not a JSON error.
  cut = str(tmp_path / "cut")
  shutil.copytree(base_run, cut)
  with open(os.path.join(cut, "checkpoints", "6", "config", "metadata"), "w") as f:
    f.write('{"model": {"na')
  weights_lib.check_source(cut, "--config.init_from", model_name="classifier")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"model 'classifier'"):
    weights_lib.check_source(cut, "--config.init_from", model_name="rar")
