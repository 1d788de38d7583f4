"""Shared pieces of the paper-pipeline tests (``tests/test_pipeline_*.py``).

Each mode runs as ``python -m genvis_jax.main`` does: the config file is read
by ``ml_collections.config_flags`` from ``configs/X.py:ARG`` with the same
``--config.a.b=value`` overrides, then ``modes.run`` (in-process, so the
chain shares one interpreter) or a real subprocess where a kill is needed.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from genvis_jax import modes
from genvis_jax.evaluate import adm_reference
from tests import multihost_common

ROOT = multihost_common.ROOT


def _args(spec: str, workdir: str, overrides: dict) -> list[str]:
  return [f"--config={os.path.join(ROOT, 'configs', spec)}",
          f"--workdir={workdir}"] + [f"--config.{k}={v}"
                                     for k, v in overrides.items()]


def load_config(spec: str, **overrides):
  """``--config=configs/<spec> --config.k=v ...`` parsed as the CLI does."""
  return parse_config_args(_args(spec, "unused", overrides))


def parse_config_args(args: list[str]):
  """The config of command-line ``args`` (``--config=...``,
  ``--config.k=v``, ``--workdir=...``) parsed as the CLI does."""
  argv = ["main"] + args
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config


def steps(n: int) -> dict:
  """Overrides for an ``n``-step training run that checkpoints and draws its
  grids at the last step only: runlocal's cadence (half the steps) would add
  a save and a grid to each short stage of the chains, without a code path
  the last step does not already take."""
  return {"train.num_steps": n, "train.checkpoint_every": n,
          "train.image_every": n}


def run_mode(spec: str, workdir: str | os.PathLike, **overrides):
  """One ``python -m genvis_jax.main`` call, in this process (``workdir`` as
  given: the tests pass ``pathlib.Path`` s too, as notebooks do)."""
  return modes.run(load_config(spec, **overrides), workdir)


def main_command(spec: str, workdir: str, **overrides) -> list[str]:
  return [sys.executable, "-m", "genvis_jax.main"] + _args(spec, str(workdir),
                                                           overrides)


def run_mode_on_processes(spec: str, workdir: str, num_processes: int = 2,
                          late_output: str | None = None,
                          **overrides) -> list[str]:
  """One ``python -m genvis_jax.main`` call launched as on a pod:
  ``num_processes`` processes of ``8 // num_processes`` fake CPU devices
  each, joined by ``jax.distributed`` on localhost: the 8 devices of the
  test process (``conftest``) split over them. Returns their logs.
  ``late_output``: a file process 0 writes last, which it now writes 3 s
  late; the others fail unless it is there when their mode returns
  (``tests/late_writer.py``)."""
  assert 8 % num_processes == 0, num_processes
  command = main_command(spec, workdir, **overrides)
  if late_output:
    command = [sys.executable, os.path.join(ROOT, "tests", "late_writer.py"),
               late_output, "3"] + command[3:]
  return multihost_common.run_processes([command] * num_processes,
                                        local_devices=8 // num_processes)


def token_records(pattern: str) -> list[tuple[int, bytes]]:
  """The (label, token bytes) records of token files, sorted: a file set's
  contents whatever the order and files they were written in."""
  from genvis_jax.data import tokens  # pylint: disable=import-outside-toplevel
  src = tokens.TokenSource(pattern)
  return sorted((int(r["label"]), np.asarray(r["tokens"]).tobytes())
                for r in (src[i] for i in range(len(src))))


def latest_step(ckpt_dir: str) -> int | None:
  steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(ckpt_dir, "*"))
           if os.path.basename(p).isdigit()]
  return max(steps) if steps else None


def train_killed_after_checkpoint(spec: str, workdir: str, timeout: float = 300,
                                  **overrides) -> int:
  """Starts training in a subprocess and SIGKILLs it once its first checkpoint
  is committed; returns that step."""
  ckpt_dir = os.path.join(str(workdir), "checkpoints")
  proc = subprocess.Popen(main_command(spec, workdir, **overrides),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      step = latest_step(ckpt_dir)
      if step is not None:
        proc.kill()
        proc.wait()
        return step
      if proc.poll() is not None:
        raise AssertionError(f"training exited ({proc.returncode}) before its "
                             f"first checkpoint:\n{proc.stderr.read()[-3000:]}")
      time.sleep(0.2)
    raise AssertionError("no checkpoint before the timeout")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def write_random_inception(path: str, seed: int = 0) -> str:
  """FID Inception with random weights as ``.npz`` (no download in tests).

  Drawn in NumPy from the abstract tree (no init compile): kernels
  He-normal N(0, 2 / fan_in) and identity batch norms keep activations
  O(1) through the ReLUs, so different image sets give different features.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax.models import inception  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  fill = {"mean": np.zeros, "bias": np.zeros, "var": np.ones, "scale": np.ones}

  def draw(path, leaf):
    name = path[-1].key
    if name in fill:
      return fill[name](leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return rng.normal(0, (2.0 / fan_in) ** 0.5, leaf.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(
      draw, inception.abstract_inception_params())
  np.savez(path, **inception.flatten_params(params))
  return path


def check_samples(out: dict, shape: tuple[int, ...]) -> np.ndarray:
  """``mode=sample`` wrote ``samples.npz`` (ADM layout) and its PNG grid."""
  assert os.path.exists(out["png"])
  with np.load(out["npz"]) as d:
    images, labels = d["arr_0"], d["labels"]
  assert images.dtype == np.uint8 and images.shape == shape, images.shape
  assert labels.shape == (shape[0],)
  return images


def evaluate_generation(spec: str, workdir: str, samples_npz: str,
                        data_spec: str) -> dict:
  """``mode=evaluate`` (ADM metrics) of ``samples_npz`` against the
  reference ``kind=reference`` makes of ``data_spec``'s eval split (16
  images, in batches of 8 as ``spec``'s runlocal evaluates: one Inception
  program for both), through a random-weight Inception."""
  workdir = str(workdir)
  os.makedirs(workdir, exist_ok=True)
  inception = write_random_inception(os.path.join(workdir, "inception.npz"))
  made = run_mode(data_spec, os.path.join(workdir, "reference"), **{
      "mode": "evaluate", "evaluate.kind": "reference",
      "evaluate.inception": inception, "evaluate.num_images": 16,
      "evaluate.batch_size": 8})
  reference = made["reference"]
  ref = adm_reference.load_reference(reference)
  assert (ref.num_images, len(ref.images), ref.preprocess) == (16, 16, "adm_tf")
  m = run_mode(spec, os.path.join(workdir, "eval"), **{
      "mode": "evaluate", "evaluate.kind": "generation",
      "evaluate.samples": samples_npz, "evaluate.reference": reference,
      "evaluate.inception": inception, "evaluate.batch_size": 8})
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert np.isfinite(m[key]), (key, m[key])
  assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
  # Barely trained samples vs real images: the features (He-normal random
  # Inception) tell the sets apart.
  assert m["fid"] > 1e-3 and m["sfid"] > 0, m
  with np.load(samples_npz) as d:
    assert m["num_samples"] == len(d["arr_0"])
  return m
