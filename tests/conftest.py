"""Test setup: 8 fake CPU devices and LLVM -O0 (``tests.xla_flags``, set
before jax is imported anywhere), and one persistent compilation cache per
test session; one BLAS thread per process; weights captured as constants
by a jitted program are an error.

Many tests build the same tiny trainer, sampler or tokenizer and compile the
same XLA programs again (a new closure misses jax's in-memory caches; the
persistent cache keys on the program itself). The session's cache lives in a
fresh temporary directory shared by the xdist workers and the subprocesses
the tests start (inherited through the environment), so every program is
still compiled once per run, and it is deleted at the end. An existing
``JAX_COMPILATION_CACHE_DIR`` is used as it is. Programs that compile in
under a second are cached too.
"""

import logging
import os
import signal
import shutil
import sys
import tempfile

import pytest

from tests import with_test_flags

# Added to a machine's own XLA_FLAGS: set alone, the flags it had would
# leave the tests one device.
os.environ["XLA_FLAGS"] = with_test_flags(os.environ.get("XLA_FLAGS"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite is written for the CPU's 8 fake devices and its numerics, also
# on a machine whose image sets JAX_PLATFORMS.
os.environ["JAX_PLATFORMS"] = "cpu"
# Settings of the user's shell that change what the code under test prints
# or does: the traceback a CLI error keeps (tests that want it set it), and
# a TPU pod worker's hosts, which would make every run join the pod.
for _name in ("GENVIS_VERBOSE", "TPU_WORKER_HOSTNAMES",
              "JAX_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES"):
  os.environ.pop(_name, None)
# One BLAS thread per test process: the xdist workers already fill the cores.
# Two processes each taking the 2048-d sqrtm of an FID evaluation ran 38 s
# each with OpenBLAS's default threads, 21 s with one thread (2 cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Weights reach jitted programs as arguments: a closed-over array is copied
# into the lowered program as a constant (seconds of lowering per 100 MB of
# weights, and the program holds a copy). Past 256 KB of such constants jax
# warns, and the tests and the processes they start make that an error: the
# test-sized models' weights are larger, the tables models build as
# constants (Inception's resize matrices: 107 KB) smaller.
os.environ.setdefault("JAX_CAPTURED_CONSTANTS_WARN_BYTES", str(256 * 1024))
_GUARD = "error:A large amount of constants were captured"
if _GUARD not in os.environ.get("PYTHONWARNINGS", ""):   # kept with others'
  os.environ["PYTHONWARNINGS"] = ",".join(
      w for w in (os.environ.get("PYTHONWARNINGS"), _GUARD) if w)

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Every program into that cache, not only those that took a second or more to
# compile (jax's default): the tests compile the same sub-second programs of
# small models many times over, and reading one back is cheaper (a third of
# the suite's model and sampler tests: 102 s -> 93 s on 2 cores).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_configure(config):
  if hasattr(config, "workerinput") or os.environ.get(_CACHE_ENV):
    return   # an xdist worker (inherits the controller's) or a user's cache
  path = tempfile.mkdtemp(prefix="genvis-jax-test-compile-cache-")
  config.genvis_compile_cache = path
  os.environ[_CACHE_ENV] = path   # before the workers start
  if "jax" in sys.modules:        # imported already: the env var was read
    sys.modules["jax"].config.update("jax_compilation_cache_dir", path)


def pytest_collection_modifyitems(config, items):
  """Files holding ``slow`` tests run first. xdist's loadfile scheduling
  (``make test``, with ``--no-loadscope-reorder``) hands out files in this
  order, so the long single-test chains start at once and the many quick
  files fill in beside them; its default order (most tests first) left
  the chains to the end, one worker running them alone."""
  del config
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)   # stable


def pytest_unconfigure(config):
  path = getattr(config, "genvis_compile_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def logging_levels_kept():
  """A test that leaves the root or absl logger at another level fails (the
  level is put back first): the tests after it in the same process would
  not see the log lines they read with ``caplog``, and fail or pass by the
  order xdist hands out the files. (Resetting absl's flags sets its logger
  to WARNING.)"""
  loggers = [logging.getLogger(), logging.getLogger("absl")]
  before = [logger.level for logger in loggers]
  yield
  after = [logger.level for logger in loggers]
  for logger, level in zip(loggers, before):
    logger.setLevel(level)
  assert after == before, (
      f"the test changed the (root, absl) loggers' levels {before} -> "
      f"{after}: restore them where it changes them")


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
  """A 6-step workdir of ``small_run.config`` with checkpoints 3 and 6,
  built once per test process (copy it before changing it)."""
  from tests import small_run  # pylint: disable=import-outside-toplevel
  wd = tmp_path_factory.mktemp("base_run") / "wd"
  small_run.train(6, wd)
  assert sorted(os.listdir(wd / "checkpoints")) == ["3", "6"]
  return str(wd)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, base_run):
  """The checkpoint-damage tests' pair: the leaves of an uninterrupted
  9-step run (what a resume must equal bit for bit) and ``base_run``."""
  from tests import small_run  # pylint: disable=import-outside-toplevel
  full = small_run.train(9, tmp_path_factory.mktemp("full_run") / "wd")
  return small_run.leaves(full), base_run


@pytest.fixture
def sigint_default():
  """SIGINT as a foreground process has it (Python's KeyboardInterrupt
  handler) for the test: one run as a background job inherits it ignored,
  which the library keeps (a stop restores the handler it found)."""
  before = signal.getsignal(signal.SIGINT)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, before)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """``gs://`` paths, as ``etils.epath`` opens them, land in the folder this
  returns (``<it>/gs:/<bucket>/...``): epath's fsspec backend over the local
  file system rooted there, instead of TensorFlow's gfile and the network.
  Code that writes ``gs://`` paths with plain ``open`` / ``os`` calls puts
  them under the working directory instead, as it would on a real VM."""
  # pylint: disable=import-outside-toplevel
  from etils.epath import backend, gpath
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem

  class Bucket(DirFileSystem):
    def glob(self, path, **kwargs):   # as gcsfs: without the protocol
      return [p.removeprefix("gs://") for p in super().glob(path, **kwargs)]

  root = tmp_path / "gcs"
  root.mkdir()
  store = Bucket(path=str(root), fs=LocalFileSystem(auto_mkdir=True))
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(type(backend.fsspec_backend), "_get_filesystem",
                      lambda self, name: store if name == "gcs" else
                      LocalFileSystem())
  return root / "gs:"
