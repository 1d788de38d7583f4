"""Reading checkpoint files without torch (``genvis_jax.convert.io``):
torch zip / legacy pickles and safetensors, nested checkpoints, unsafe
pickles refused, a parameters folder, another model's file named so.

Fixtures: ``tests/fixtures/io`` (see tests/fixtures/README.md).
"""

import os
import pickle
import pathlib
import re
import zipfile

import jax
import ml_collections
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from genvis_jax import convert, errors
from genvis_jax.convert import io as cio
from tests import compiles

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def expected_io():
  with np.load(os.path.join(FIX, "io", "expected.npz")) as f:
    return {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith("value/")}, \
           {k.split("/", 1)[1]: str(f[k]) for k in f.files if k.startswith("dtype/")}


def _assert_state(state, expected_io):
  values, dtypes = expected_io
  assert sorted(state) == sorted(values)
  for k, v in values.items():
    assert str(state[k].dtype) == dtypes[k], k  # torch and numpy names agree
    assert state[k].shape == v.shape, k
    np.testing.assert_array_equal(state[k].astype(np.float32), v, err_msg=k)


@pytest.mark.parametrize("name,key", [("nested.pt", "model"), ("legacy.pth", None),
                                      ("weights.safetensors", None)])
def test_io_reads_torch_and_safetensors_files(name, key, expected_io):
  state = cio.load_state_dict(os.path.join(FIX, "io", name), key=key)
  _assert_state(state, expected_io)
  assert state["layer.bias"].dtype == ml_dtypes.bfloat16
  assert state["half"].dtype == np.float16 and state["count"].dtype == np.int64


def test_io_nested_checkpoint_selection():
  path = os.path.join(FIX, "io", "nested.pt")
  obj = cio.read_file(path)
  assert obj["step"] == 3 and obj["args"].lr == 1e-4 and obj["best"] == 2.5
  with pytest.raises(ValueError, match="several weight dicts.*--key"):
    cio.load_state_dict(path)
  ema = cio.load_state_dict(path, key="ema")
  assert all((v.astype(np.float32) == 1).all() for v in ema.values())
  with pytest.raises(KeyError, match="no entry 'nope'"):
    cio.load_state_dict(path, key="nope")


def _torch_like_zip(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", payload)
    zf.writestr("archive/version", "3\n")


def test_io_refuses_pickles_with_disallowed_globals(tmp_path):
  evil = tmp_path / "evil.pt"
  # GLOBAL os.system, then a call: plain pickle.load would run the command.
  _torch_like_zip(evil, b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode()
                  + b"'\ntR.")
  with pytest.raises(errors.UnsafeCheckpointError, match="'os.system'.*refusing"):
    cio.load_state_dict(str(evil))
  assert not (tmp_path / "pwned").exists()
  # A model class is refused too, and pickle.UnpicklingError catches it.
  _torch_like_zip(evil, pickle.dumps({"m": zipfile.ZipInfo()}))
  with pytest.raises(pickle.UnpicklingError, match="zipfile.ZipInfo"):
    cio.read_file(str(evil))


def test_io_unknown_format_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    cio.read_file(__file__)


def test_load_weights_from_a_params_folder_gives_jax_arrays(tmp_path):
  """An Orbax ``params`` folder (saved here from device arrays) loads as the
  jax arrays ``load_weights`` promises, in the expected dtypes."""
  from genvis_jax.core import weights  # pylint: disable=import-outside-toplevel
  tree = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  weights.save_params(str(tmp_path / "w"), jax.device_put(tree, jax.devices()[1]))
  expected = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  got = convert.load_weights(str(tmp_path / "w"), expected)
  leaf = got["dense"]["kernel"]
  assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
  np.testing.assert_array_equal(leaf, tree["dense"]["kernel"])


def test_a_file_of_another_model_is_named_so(tmp_path):
  """A file whose names the converter does not know (e.g. a tokenizer given
  as the DINO discriminator's ViT) is another model's file, with the fix:
  not "it holds 0 parameters" against the expected tree."""
  from genvis_jax.convert import dino_vit   # pylint: disable=import-outside-toplevel
  np.savez(tmp_path / "tok.npz", **{f"encoder.conv_{i}.weight": np.zeros(2)
                                    for i in range(30)})
  with pytest.raises(errors.CheckpointFileError,
                     match=r"tok.npz \(config.disc.vit_path\) holds 30 arrays, "
                           r"none of them DINO ViT weights \(e.g. 'encoder.conv"
                           r"_0.weight'\): another model's file\? Download .* "
                           r"dino_deitsmall16_pretrain.pth"):
    dino_vit.load_dino_vit(str(tmp_path / "tok.npz"))
  # --key naming no entry: the message as written, the entries capped.
  with pytest.raises(errors.WeightKeyError) as e:
    cio.select_state_dict({f"k{i}": {} for i in range(30)}, "model", "x.pt")
  assert str(e.value) == ("x.pt: no entry 'model' (from key='model'); it holds "
                          + ", ".join(f"'k{i}' (dict)" for i in range(8))
                          + ", ... 22 more.")


def test_io_says_what_a_file_is_when_it_holds_no_weights(tmp_path):
  """A safetensors file under another suffix is read by its content; a Git
  LFS pointer, a folder and an EMA copy beside the raw weights are named."""
  st = tmp_path / "model.bin"   # a safetensors file, renamed
  with open(os.path.join(FIX, "io", "weights.safetensors"), "rb") as f:
    st.write_bytes(f.read())
  assert sorted(cio.load_state_dict(str(st))) == sorted(
      cio.load_state_dict(os.path.join(FIX, "io", "weights.safetensors")))
  lfs = tmp_path / "lfs.bin"
  lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"
                 "size 123\n")
  with pytest.raises(errors.CheckpointFileError, match="Git LFS pointer.*lfs pull"):
    cio.read_file(str(lfs))
  (tmp_path / "conv" / "params").mkdir(parents=True)
  with pytest.raises(errors.CheckpointFileError,
                     match=r"is a folder; --src takes the weight file.*converted "
                           "weights already"):
    cio.read_file(str(tmp_path / "conv"))
  raw = {"w": np.zeros(2, np.float32)}
  with pytest.raises(errors.CheckpointFileError,
                     match=r"several weight dicts \('state_dict', 'state_dict_ema'\)"):
    cio.select_state_dict({"state_dict": raw, "state_dict_ema": raw, "epoch": 3})


def test_convert_names_a_wrong_kind_or_output_before_reading(tmp_path):
  """A kind of another model than --config's, a file or a training run as
  --dst, and advice for the kinds without a config (no --src is read)."""
  from configs import rar_b   # pylint: disable=import-outside-toplevel
  config = rar_b.get_config("runlocal")
  with pytest.raises(errors.ConfigError,
                     match=r"--kind=maskgit_vqgan converts 'maskgit_vqgan' weights, "
                           r"but the --config model is 'rar': this config's "
                           r"tokenizer .*--config=configs/maskgit_vqgan.py"):
    convert.convert_file("maskgit_vqgan", "none.bin", config.model, str(tmp_path / "o"),
                         config=config)
  with pytest.raises(errors.ConfigError, match=r"--kind=far if the file holds 'far'"):
    convert.check_kind("rar", ml_collections.ConfigDict({"name": "far"}))
  with pytest.raises(errors.ConfigError,
                     match=r"--config=genvis_jax/convert/clip_vision.py:NAME"):
    convert.check_kind("clip_vision", None)
  with pytest.raises(errors.ConfigError, match=r"'lpips' is one fixed .* takes no --config"):
    convert.check_kind("lpips", config.model)
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.OutputExistsError, match="is a file; this kind writes a folder"):
    convert.convert_file("rar", "none.bin", config.model, str(tmp_path / "file"),
                         overwrite=True)
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(errors.OutputExistsError, match="training run's workdir"):
    convert.convert_file("rar", "none.bin", config.model, str(tmp_path / "run"),
                         overwrite=True)
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"\n  LPIPS takes both official files.*vgg.pth"):
    convert.from_torch("lpips", {}, None)
  # A --src that is not there: where the kind's official files come from.
  with pytest.raises(errors.CheckpointFileNotFoundError,
                     match=r"none.bin not found.*The official rar weights: e.g. "
                           r"`hf download yucornetto/RAR rar_b.bin --local-dir "
                           r"weights`; README.md"):
    convert.convert_file("rar", "none.bin", config.model, str(tmp_path / "o"))


def test_each_kinds_source_is_the_readmes():
  """The commands a missing --src names are the README's, verbatim (its
  continued lines joined), each runnable as printed: a download named
  without its URL (Inception, LPIPS) could not run, and LPIPS named one of
  its two files."""
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  flat = re.sub(r"\s*\\\n\s*", " ", readme)
  assert set(convert.SOURCES) <= set(convert.kinds())
  for kind, command in convert.SOURCES.items():
    for part in command.split(" && "):
      assert part in flat, (kind, part)
      assert part.startswith("hf download ") or re.fullmatch(
          r"curl -L -o \S+ https://\S+", part), (kind, part)
  assert convert.SOURCES["lpips"].count("curl") == 2


def test_converted_weights_of_another_model_are_named_so(tmp_path):
  """A tokenizer's converted folder given where a generator's is expected
  (or the reverse) is refused naming both models, not by its key names."""
  from genvis_jax.core import weights  # pylint: disable=import-outside-toplevel
  tree = {"dense": {"kernel": np.zeros((2, 3), np.float32)}}
  weights.save_params(str(tmp_path / "tok"), tree, ml_collections.ConfigDict(
      {"model": {"name": "maskgit_vqgan"}}))
  expected = {"other": {"kernel": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"tok \(config.init_from\) holds weights converted for "
                           r"model 'maskgit_vqgan'; model 'rar' is expected here"):
    weights.restore_params(str(tmp_path / "tok"), expected,
                           setting="config.init_from", model_name="rar")
  # Its inner params/ folder named: the hint points at the folder itself.
  with pytest.raises(FileNotFoundError,
                     match=r"tok/params is the inside of a parameter checkpoint: "
                           r"point the setting at its folder, .*tok\.$"):
    weights.restore_params(str(tmp_path / "tok" / "params"), expected,
                           setting="config.init_from", model_name="rar")


def test_load_weights_compiles_nothing(tmp_path, caplog):
  """Official weights (an .npz here) become jax arrays without a program per
  array shape: an eager ``jnp.asarray`` per leaf compiled 55 for Inception's
  472 arrays at every evaluation's start. float64 arrays arrive as jax's
  float32, as before."""
  rng = np.random.default_rng(0)
  flat = {f"layer{i}/kernel": rng.standard_normal((i + 1, 7 - i))
          for i in range(5)}
  np.savez(tmp_path / "w.npz", **flat)
  with compiles.compiled(caplog) as programs:
    got = convert.load_weights(str(tmp_path / "w.npz"))
  assert not programs, programs
  for i in range(5):
    leaf = got[f"layer{i}"]["kernel"]
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
    np.testing.assert_allclose(leaf, flat[f"layer{i}/kernel"], rtol=1e-7)
