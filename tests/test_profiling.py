"""The training profile window (core/profiling.py): which steps a run
traces, and that a resume does not trace again."""

import os

from genvis_jax.core import profiling


def test_a_resume_traces_from_its_own_start_once_per_run(tmp_path):
  """A resumed run skips its own first steps (compilation) before tracing;
  where the workdir already holds a trace it traces none: rerunning "the
  same command" after each preemption added a trace (MBs, and the traced
  steps' time) per start."""
  fresh = profiling.StepWindow(str(tmp_path), start=3, num=2, skip=2)
  assert fresh.enabled and (fresh.first, fresh.last) == (5, 6)
  os.makedirs(tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00")
  assert not profiling.StepWindow(str(tmp_path), start=3, num=2,
                                  skip=2).enabled
  # A fresh run (step 0) in a workdir with a trace: asked for, traced.
  assert profiling.StepWindow(str(tmp_path), start=0, num=2, skip=2).enabled
