"""glibc malloc tuning for XLA:CPU: when it applies, and that it stops the
per-execution page faults it is there to stop."""

import os
import subprocess
import sys

import pytest

from genvis_jax import cpu_malloc

# A jitted step whose temp buffer (196 MB) exceeds glibc's mmap limits, run 40
# times; prints the minor page faults of each of the last 10 runs (the tuned
# heap grows for a few runs until it holds free blocks it can reuse, then stays
# put; a busy machine may still make glibc hand a block back now and then).
_PROBE = r"""
import resource, sys
if sys.argv[1] == "1":
  from genvis_jax import cpu_malloc
  assert cpu_malloc.tune(force=True)
import jax, jax.numpy as jnp

@jax.jit
def step(x):
  big = jnp.tanh(jnp.outer(x, x))    # 7000 x 7000 f32, materialised for the dot
  return x + 1e-3 * (big @ x)

x = jnp.linspace(0.0, 1.0, 7000)
for _ in range(30):
  x = step(x).block_until_ready()
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  x = step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(tuned: bool) -> list[int]:
  """Minor page faults of each of the probe's last 10 steps, sorted."""
  # Without the shell's own malloc settings (GLIBC_TUNABLES with huge pages,
  # as cpu_malloc's docstring suggests, faults once per 2 MB).
  env = {k: v for k, v in os.environ.items()
         if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
  env.update(GENVIS_CPU_MALLOC="1", XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE, "1" if tuned else "0"],
                       env=env, capture_output=True, text=True, check=True)
  return sorted(map(int, out.stdout.strip().splitlines()[-1].split()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuning_stops_per_step_page_faults():
  plain = _faults(False)
  if plain[0] < 4_000:   # e.g. transparent huge pages set to "always"
    pytest.skip(f"the untuned heap hardly faults here ({plain}): nothing "
                "for the tuning to stop")
  tuned = _faults(True)
  # Untuned: every run maps and touches the temp buffer afresh (~48k faults).
  assert plain[0] > 40_000, plain
  # Tuned: most runs reuse the heap's pages (the median run faults none here;
  # a CI machine once saw one run in ten fault the buffer again).
  assert tuned[5] < 4_000, (tuned, plain)
  assert sum(tuned) < sum(plain) / 4, (tuned, plain)


def test_applies_only_on_cpu(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not cpu_malloc.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_malloc.cpu_only()
  monkeypatch.setenv("GENVIS_CPU_MALLOC", "0")
  assert not cpu_malloc.tune()
