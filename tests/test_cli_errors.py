"""The command line: a user error prints one message (no traceback) and
exits non-zero; --help and config arguments explain themselves."""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import demo
from genvis_jax import cli
from genvis_jax import modes
from genvis_jax.errors import UserError
from tests import cli_runner
from tests import sample_common as sc
from tests import xla_flags


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


# --- the command line: one message, no traceback, non-zero exit -----------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["--config=configs/demo.py"]
CLASSIFIER = DEMO + ["--config.only=classifier"]


@pytest.fixture(scope="module")
def run_cli(tmp_path_factory):
  """``run_cli(args, verbose_env=False)``: ``python -m genvis_jax.main ARGS`` in a
  fresh process state (forked by ``cli_runner`` after the imports), 8 CPU
  devices, ``GENVIS_VERBOSE`` unset unless asked for."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "XLA_FLAGS": xla_flags(8)}
  env.pop("GENVIS_VERBOSE", None)
  runner, outs = cli_runner.Runner(env), tmp_path_factory.mktemp("cli")
  calls = iter(range(10**6))

  def run(args, verbose_env=False):
    return runner.run(args, outs / str(next(calls)),
                      env={"GENVIS_VERBOSE": "1"} if verbose_env else None)
  yield run
  runner.close()


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
    "positional": (["--config=configs/rar_b.py:runlocal", "extra"],
                   r"Unexpected arguments \['extra'\]; flags are written "
                   r"--name=value"),
    "config_value": (DEMO + ["--config.stages.rar.train.num_steps=abc"],
                     "num_steps=abc: invalid literal for int"),
    "config_arg": (["--config=configs/rar_b.py:bogus"],
                   "Unknown config argument 'bogus'"),
    # A misspelt flag where the config takes a precision first.
    "config_arg_precision": (["--config=configs/fqgan_dual_ds16.py:runlcoal"],
                             r"Unknown config argument 'runlcoal'; this config "
                             r"takes a precision \(bf16 or fp32\) and the flags "
                             r"runlocal and"),
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
    "model_setting": (["--config=configs/maskgit_vqgan.py:runlocal",
                       "--config.model.code_dim=16"],
                      r"config.model.code_dim \(16\) must equal "
                      r"config.model.z_channels"),
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
    # A token-data run trained with the flips pre-tokenizing wrote.
    "unread_data_key": (
        ["--config=configs/rar_b.py:runlocal",
         "--config.data.random_flip=False"],
        r"--config.data.random_flip would be read by nothing: "
        r"config.data.source='tokens' reads pre-tokenized codes, whose crops "
        r"and flips pre-tokenizing fixed \(config.pretokenize.ten_crop\)\. "
        r"Drop it\.$"),
    # ml_collections keeps this load failure for the first read of the config.
    "flagfile_missing_config": (
        ["--flagfile={flagfile}"],
        r"Loading the config \(--config\) failed: .*No such file or directory: "
        r"'configs/nope.py'"),
}


FLAG_ERRORS = ("no_workdir", "no_config", "no_config_file",
               "flagfile_missing_config", "config_key", "config_value",
               "config_index", "config_arg", "config_arg_precision",
               "positional")


@pytest.mark.parametrize("name", list(CASES))
def test_cli_user_errors_print_one_message(name, tmp_path, bad_params_dir, run_cli):
  args, pattern = CASES[name]
  (tmp_path / "afile").write_text("not a directory")
  (tmp_path / "flags").write_text("--config=configs/nope.py\n")
  args = [a.replace("{bad}", bad_params_dir).replace(
      "{file}", str(tmp_path / "afile")).replace(
          "{flagfile}", str(tmp_path / "flags")) for a in args]
  if name != "no_workdir" and not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={tmp_path / 'wd'}")
  out = run_cli(args)
  # main.py's exit statuses: 2 for a flag the command line gave wrong, 1 for
  # what the run refused.
  assert out.returncode == (2 if name in FLAG_ERRORS else 1), out.stderr
  assert "Traceback" not in out.stdout + out.stderr, out.stderr
  err = out.stderr
  assert "Error: " in err and re.search(pattern, err, re.S), err
  # The error is the last thing printed: no log line or config dump after it.
  tail = err[err.rindex("Error: "):]
  assert not re.search(r"^[IWEF]\d{4} ", tail, re.M), err
  assert "global_batch_size:" not in err     # the config is not dumped


def test_cli_verbose_keeps_the_traceback(tmp_path, run_cli):
  args, pattern = CASES["no_data"]
  out = run_cli(args + [f"--workdir={tmp_path}", "--verbose"])
  assert out.returncode != 0
  assert "Traceback" in out.stderr and "DataNotFoundError" in out.stderr
  out = run_cli(["--config=configs/rar_xl.py"], verbose_env=True)
  assert out.returncode != 0 and "Traceback" in out.stderr


def test_help_lists_the_runnable_configs_and_their_arguments(run_cli):
  out = run_cli(["--help"])   # absl's --help exits 1
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


def test_a_config_argument_error_gives_an_example_for_that_file(tmp_path, run_cli):
  out = run_cli(["--config=configs/demo.py:runlocal", f"--workdir={tmp_path}/w"])
  assert out.returncode == 2
  assert ("Unknown config argument 'runlocal'; this config takes smoke (a "
          "flag), comma-separated (e.g. --config=configs/demo.py:smoke)"
          in out.stderr), out.stderr
  assert not os.path.exists(tmp_path / "w")


def test_demo_mode_and_job_configs_are_not_mixed(tmp_path):
  from configs import rar_b   # pylint: disable=import-outside-toplevel
  job = rar_b.get_config()
  job.mode = "demo"
  with pytest.raises(UserError, match=r"mode=demo runs a demo config.*"
                     r"configs/demo.py"):
    modes.check_names(job)
  # The Python API checks as the command line does, before any folder.
  with pytest.raises(UserError, match=r"mode=demo runs a demo config"):
    modes.run(job, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()
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


def test_the_python_api_refuses_an_empty_workdir(tmp_path, monkeypatch):
  """An unset variable passed as the workdir: evaluation wrote its files
  and a lock into the current folder, training failed with a bare
  ``FileNotFoundError: ''`` (None: a ``TypeError``)."""
  from configs import maskgit_vqgan   # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  config = maskgit_vqgan.get_config("runlocal")
  for mode in ("evaluate", "train"):
    config.mode = mode
    for workdir in ("", None):
      with pytest.raises(UserError, match=r"workdir is (''|None): pass the "
                         r"folder the run writes to"):
        modes.run(config, workdir)
  assert not list(tmp_path.iterdir())
  with pytest.raises(UserError, match=r"config is a dict, not an "
                     r"ml_collections ConfigDict.*ConfigDict\(d\)"):
    modes.run(config.to_dict(), tmp_path / "wd")


def test_a_job_runs_at_the_configs_matmul_precision(tmp_path, monkeypatch):
  """``config.matmul_precision`` is what a job's fp32 dots compute in (the
  Equivariant generators and tokenizer: full fp32, as the official, where
  XLA's default on a TPU is one bf16 pass), through the command line and
  the Python API alike (the entry points and the sampler a notebook calls
  apply it); a value jax does not take is refused before any work."""
  from configs import eq_s   # pylint: disable=import-outside-toplevel
  import jax   # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import sampler as sampler_lib   # pylint: disable=import-outside-toplevel
  from genvis_jax.train import trainer   # pylint: disable=import-outside-toplevel
  from configs import eq_tokenizer   # pylint: disable=import-outside-toplevel
  config = eq_s.get_config("runlocal")
  assert config.matmul_precision == "float32"
  # The official trains its tokenizer in fp32 too (was XLA's default).
  for arg in ("", "stage2", "runlocal"):
    assert eq_tokenizer.get_config(arg).matmul_precision == "float32", arg
  # The modes that produce data or numbers run '' at TF32 or better, as the
  # official scripts (allow_tf32); XLA's default on a TPU is one bf16 pass.
  for mode, kind in (("train", "train"), ("sample", "inference"),
                     ("evaluate", "inference"), ("pretokenize", "inference")):
    assert getattr(modes.resolve(mode), "at_matmul_precision", "") == kind, mode

  def traced(*args):
    del args
    dot = jax.jit(lambda a: a @ a).lower(np.ones((2, 2), np.float32))
    return jax.config.jax_default_matmul_precision, dot.as_text()

  class Seen(Exception):
    pass

  def setup(c):
    raise Seen(traced())
  monkeypatch.setattr(trainer, "setup", setup)
  for precision, highest in (("float32", True), ("", False)):
    config.matmul_precision = precision
    with pytest.raises(Seen) as e:
      trainer.train_and_evaluate(config, tmp_path / "wd")
    setting, hlo = e.value.args[0]
    assert (setting == "float32") == highest and ("HIGHEST" in hlo) == highest
    assert "HIGH, HIGH" not in hlo      # training keeps XLA's default
    sampler = sampler_lib.Sampler(
        traced, sc.PassThroughDecoder, precision=lambda: (
            modes.dtypes.matmul_precision(config, inference=True)))
    want = "HIGHEST, HIGHEST" if highest else "HIGH, HIGH"
    assert f"precision = [{want}]" in sampler(None, None)[1]
  config.matmul_precision = "fp32"
  with pytest.raises(UserError, match=r"config.matmul_precision='fp32'; "
                     r"choose one of \['', 'bfloat16', 'tensorfloat32', "
                     r"'float32'\]"):
    modes.check_names(config)


def test_library_logs_are_quiet_before_anything_has_logged():
  """``quiet_library_logs`` as a notebook or script calls it first, before
  any record made the handler that prints (absl's first record sets up the
  root logger's): Orbax's and Grain's INFO lines were printed, 90 of the
  119 lines of a 4-step run."""
  code = textwrap.dedent("""
      import logging as py_logging
      from absl import logging
      from genvis_jax import cli
      logging.set_verbosity(logging.INFO)
      assert not py_logging.getLogger().handlers
      cli.quiet_library_logs()
      logging.info("our line")   # the first record: a handler is made
      absl_logger = logging.get_absl_logger()
      for path, text in (("/site-packages/orbax/checkpoint/manager.py",
                          "orbax chatter"),
                         ("/site-packages/grain/_src/python/x.py",
                          "grain chatter")):
        absl_logger.handle(absl_logger.makeRecord(
            "absl", logging.INFO, path, 1, text, (), None))
      logging.warning("orbax warns /orbax/")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, timeout=120)
  assert "our line" in out.stderr and "orbax warns" in out.stderr, out.stderr
  assert "chatter" not in out.stderr, out.stderr
