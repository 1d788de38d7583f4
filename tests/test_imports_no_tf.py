"""The modules a GPU machine without TensorFlow needs import without it.

Accelerator machines lent to this project have jax / flax / optax / orbax but no
tensorflow, tensorflow_datasets, clu, grain or array_record. A subprocess
installs a ``sys.meta_path`` finder that raises ImportError for those packages
(and their submodules) and imports every module the accelerator suite uses.
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "grain", "array_record")

MODULES = (
    "genvis_jax.models", "genvis_jax.kernels",
    "genvis_jax.sample.rar", "genvis_jax.sample.far", "genvis_jax.sample.eq_generator",
    "genvis_jax.evaluate.fid", "genvis_jax.evaluate.generation",
    "genvis_jax.evaluate.inception",
    "genvis_jax.train.step", "genvis_jax.core.sharding",
    "genvis_jax.train.state", "genvis_jax.train.optimizers",
    # What bench/accelerator.py builds the train step with.
    "genvis_jax.train.trainer", "genvis_jax.train.tasks.rar",
    "genvis_jax.data.sources",   # the data-source checks of trainer.setup
)

# Shared with tests/test_accelerator_bench.py: prepended to a ``python -c``.
BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    _BLOCKED = {BLOCKED!r}
    class _Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
          raise ImportError(f"{{name}} is blocked (not on the GPU machine)")
        return None
    sys.meta_path.insert(0, _Block())
""")


def run_blocked(code: str, timeout: float = 300, cwd: str = ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=cwd,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_blocker_blocks():
  # The hook must really make the packages unimportable (else the test below
  # proves nothing). tensorflow and clu are installed here.
  proc = run_blocked(textwrap.dedent("""
      for name in ("tensorflow", "clu.metric_writers", "grain"):
        try:
          __import__(name)
        except ImportError:
          continue
        raise SystemExit(f"{name} imported despite the block")
      print("blocked")
  """))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "blocked" in proc.stdout


def test_modules_import_without_tensorflow():
  proc = run_blocked(textwrap.dedent(f"""
      import importlib, sys
      sys.path.insert(0, {ROOT!r})
      failed = []
      for m in {MODULES!r}:
        try:
          importlib.import_module(m)
        except Exception as e:
          failed.append(f"{{m}}: {{type(e).__name__}}: {{e}}")
      leaked = sorted(k for k in sys.modules if k.split(".")[0] in {BLOCKED!r})
      print("FAILED", failed)
      print("LEAKED", leaked)
      raise SystemExit(1 if failed or leaked else 0)
  """))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
