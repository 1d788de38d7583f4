"""What a conversion writes (``convert.convert_file``): the weights whole or
not at all, with a record of the files read; training wrappers' key
prefixes."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from genvis_jax import convert, errors, models
from genvis_jax.core import param_checkpoint
from genvis_jax.core import weights
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError
from genvis_jax.core.weights import restore_params
from tests.test_convert import _fixture, _rar_config, _write_npz


@pytest.fixture(scope="module")
def rar():
  data, state = _fixture("rar_parity.npz")
  cfg = _rar_config(data)
  return data, state, cfg, None, convert.from_torch("rar", state, cfg)


def test_training_wrapper_prefixes_are_dropped_or_named(rar, tmp_path):
  """DDP, AveragedModel and torch.compile prefixes are dropped (only a whole
  ``module.`` was); another prefix on every key is named, where the report
  blamed --config alone."""
  _, state, cfg, _, params = rar
  for wrapped in ({f"module._orig_mod.{k}": v for k, v in state.items()},
                  {**{f"module.{k}": v for k, v in state.items()},
                   "n_averaged": np.array(3)}):
    got = convert.convert_file(
        "rar", _write_npz(tmp_path / "w.npz", wrapped), cfg,
        str(tmp_path / "out"), overwrite=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  lightning = {f"model.{k}": v for k, v in state.items()}
  with pytest.raises(CheckpointMismatchError,
                     match=r"Every key of the file starts with 'model.': a "
                           r"training wrapper's name"):
    convert.convert_file("rar", _write_npz(tmp_path / "l.npz", lightning),
                         cfg, str(tmp_path / "l"))
  own = {k: v for k, v in state.items() if k != "lm_head.bias"}
  with pytest.raises(CheckpointMismatchError) as e:   # no shared prefix
    convert.from_torch("rar", own, cfg)
  assert "Every key" not in str(e.value)


def test_a_failed_write_keeps_the_weights_there_and_says_why(rar, tmp_path,
                                                               monkeypatch):
  """A full disk gave ~300 lines of Orbax tracebacks; ``--overwrite`` had
  deleted the old weights before the new ones failed; a stop between the
  arrays and their records left weights that loaded unchecked; a read-only
  --dst failed after reading and converting, then hung for 5 minutes."""
  import orbax.checkpoint as ocp
  _, state, cfg, _, _ = rar
  src = _write_npz(tmp_path / "rar.npz", state)
  dst = tmp_path / "ckpt"
  config = ml_collections.ConfigDict({"model": cfg})
  convert.convert_file("rar", src, cfg, str(dst), config=config)
  before = {n: (dst / n).read_bytes() for n in (
      "params_sha256.json", "config.json", "converted_from.json")}

  async def full_disk(self, *args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on "
                     "device [os_error_code='28']")
  with monkeypatch.context() as m:
    m.setattr(ocp.StandardCheckpointHandler, "async_save", full_disk)
    for target, overwrite in ((dst, True), (tmp_path / "new", False)):
      with pytest.raises(errors.OutputWriteError,
                         match=r"^Could not write the converted weights to "
                               r".*: no space left on device .* Weights "
                               r"already there are kept"):
        convert.convert_file("rar", src, cfg, str(target), config=config,
                             overwrite=overwrite)
  # The old weights, whole, with their records; nothing of the new.
  assert sorted(os.listdir(dst)) == ["config.json", "converted_from.json",
                                     "params", "params_sha256.json"]
  assert before == {n: (dst / n).read_bytes() for n in before}
  abstract = jax.eval_shape(lambda r: models.init_params(cfg, r),
                            jax.random.key(0))
  restore_params(str(dst), abstract, model_config=cfg)   # digest checked
  assert os.listdir(tmp_path / "new") == []
  # What a killed write leaves (Orbax's temporary folder, the records
  # written first) is named as unfinished.
  (tmp_path / "new" / "params.orbax-checkpoint-tmp-1").mkdir()
  (tmp_path / "new" / "config.json").write_text("{}")
  with pytest.raises(errors.OutputExistsError,
                     match=r"holds an unfinished conversion \(config.json, "
                           r"params.orbax-checkpoint-tmp-1: .* --overwrite"):
    convert.convert_file("rar", src, cfg, str(tmp_path / "new"))
  # A folder it cannot write: refused before --src is read.
  monkeypatch.setattr(convert.os, "access", lambda path, mode: False)
  with pytest.raises(errors.OutputWriteError,
                     match=r"^Cannot write --dst=.*/ro/out: .* is not "
                           r"writable"):
    convert.convert_file("rar", "/no/such/src.bin", cfg,
                         str(tmp_path / "ro" / "out"))


def test_an_npz_kind_refuses_another_dst_before_reading(tmp_path):
  """A teacher / LPIPS --dst without .npz failed after the whole source was
  read and converted."""
  with pytest.raises(ValueError, match=r"--dst=.*/out: this kind writes one "
                     r"\.npz file"):
    convert.convert_file("lpips", "/no/such/vgg.pth", None,
                         str(tmp_path / "out"))


@pytest.mark.parametrize("stop_before", range(1, 11))
def test_a_replacement_stopped_between_its_renames_mixes_nothing(
    tmp_path, stop_before):
  """The move of the staged weights into place, stopped before any of its
  renames: old weights with their records, or the new with theirs, or no
  weights at all (a loud error, the old set aside), never weights beside
  the other conversion's records (new weights loaded with the old config's
  checks, or none) and never the old weights gone."""
  d = str(tmp_path / "w")
  w = lambda v: {"w": np.full((4,), v, np.float32)}
  config = lambda name: ml_collections.ConfigDict({"model": {"name": name}})
  param_checkpoint.save_params(d, w(0.0), config("old"))
  with open(os.path.join(d, "NOTES.txt"), "w") as f:   # a user's own file
    f.write("kept")
  path_type = type(param_checkpoint.epath.Path(d))
  rename, calls = path_type.rename, []

  def stopping(self, target):
    if param_checkpoint.STAGING in str(target) + str(self) or (
        param_checkpoint.REPLACED in str(target)):
      calls.append(self.name)
      if len(calls) == stop_before:
        raise KeyboardInterrupt
    return rename(self, target)

  path_type.rename = stopping
  try:
    param_checkpoint.save_params(d, w(1.0), config("new"))
    stopped = False
  except KeyboardInterrupt:
    stopped = True
  finally:
    path_type.rename = rename
  abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32)}
  try:
    got = float(restore_params(d, abstract)["w"][0])
  except errors.UserError:
    assert stopped   # no weights: said; the old kept aside
    assert os.path.isdir(os.path.join(d, param_checkpoint.REPLACED, "params"))
    # The rerun says so, whatever else the folder holds.
    with pytest.raises(errors.OutputExistsError,
                       match=r"holds an unfinished conversion .* The weights "
                             r"it was replacing are in .*/\.params_replaced/"
                             r"params"):
      convert._check_dst(d, overwrite=False)   # pylint: disable=protected-access
    return
  recorded = weights.recorded_config(d)[0]
  assert recorded and recorded["model"]["name"] == {0.0: "old",
                                                    1.0: "new"}[got]
  assert os.path.exists(os.path.join(d, param_checkpoint.DIGEST_FILE))
  assert stopped or got == 1.0
