"""Run-health checks of the training loop: NaN/Inf and finite divergence.

Checked on values the loop fetches anyway (the interval's mean metrics at log
steps and right before each checkpoint) plus one parameter-norm reduction at
those steps, so no step adds a device sync and no diverged state is saved.

- ``config.train.check_finite`` (bool): stop on a NaN/Inf loss, gradient or
  parameter norm. Off: the step already skips such updates; they are counted
  in the ``nonfinite_steps`` scalar and training goes on.
- ``config.train.divergence_factor`` (float, 0 = off): stop when the mean loss
  of an interval exceeds this multiple of the running median of earlier
  intervals (once ``MIN_HISTORY`` intervals are known and the median is
  positive), or a parameter group's norm exceeds this multiple of its running
  median (seeded with the norm of the state the run starts from). A NaN/Inf
  parameter norm is past any such bound: it stops the run with
  ``check_finite`` off too (an update with finite gradients can overflow the
  parameters, which skipping NaN/Inf updates does not undo).
"""

from __future__ import annotations

import collections
import math

import numpy as np

from genvis_jax.errors import UserError

DEFAULT_DIVERGENCE_FACTOR = 100.0
MIN_HISTORY = 5   # loss intervals needed before the loss bound applies
WINDOW = 50       # intervals in the running medians


class TrainingDivergedError(UserError, FloatingPointError):
  """Training stopped because its numbers blew up (NaN/Inf or a runaway)."""


class NonFiniteLossError(TrainingDivergedError):
  """Loss, gradients or parameters became NaN/Inf (``train.check_finite``;
  NaN/Inf parameters also with ``train.divergence_factor``)."""


class DivergenceError(TrainingDivergedError):
  """A finite runaway: loss or parameter norm far above its running median."""


class DivergenceGuard:
  """Running medians of the interval loss and of each group's parameter norm.

  ``check`` returns a reason (str) when the new values are out of bounds,
  else None; ``record`` adds one log interval to the history.
  """

  def __init__(self, factor: float, check_finite: bool = True):
    self.factor = float(factor)
    self.check_finite = bool(check_finite)
    self._loss = collections.deque(maxlen=WINDOW)
    self._norms = collections.defaultdict(
        lambda: collections.deque(maxlen=WINDOW))

  def record(self, loss: float | None, param_norms: dict[str, float]) -> None:
    if loss is not None and math.isfinite(loss):
      self._loss.append(float(loss))
    for g, v in param_norms.items():
      if math.isfinite(v):
        self._norms[g].append(float(v))

  def nonfinite_params(self, param_norms: dict[str, float]) -> str | None:
    """Why the parameter norms count as NaN/Inf, or None: checked by
    ``check_finite`` and, past any bound, by the divergence check."""
    bad = [g for g, v in param_norms.items() if not math.isfinite(v)]
    if not bad or not (self.check_finite or self.factor > 0):
      return None
    what = f"the parameter norm of group(s) {', '.join(bad)} is NaN/Inf"
    if not self.check_finite:
      what += (f" (config.train.divergence_factor={self.factor:g}; "
               "config.train.check_finite=False skips only updates whose "
               "loss or gradients are NaN/Inf)")
    return what

  def runaway(self, loss: float, param_norms: dict[str, float]) -> str | None:
    """Why the finite values count as divergence, or None (NaN/Inf norms
    are ``nonfinite_params``')."""
    if self.factor <= 0:
      return None
    if len(self._loss) >= MIN_HISTORY and math.isfinite(loss):
      med = float(np.median(self._loss))
      if med > 0 and loss > self.factor * med:
        return (f"the loss {loss:.4g} is {loss / med:.3g}x its running median "
                f"{med:.4g} (config.train.divergence_factor={self.factor:g})")
    groups = self.runaway_groups(param_norms)
    if not groups:
      return None
    g = groups[0]
    v, med = param_norms[g], float(np.median(self._norms[g]))
    return (f"the parameter norm of group {g!r} is {v:.4g}, {v / med:.3g}x "
            f"its running median {med:.4g} "
            f"(config.train.divergence_factor={self.factor:g})")

  def runaway_groups(self, param_norms: dict[str, float]) -> list[str]:
    """The groups whose finite parameter norm is past ``factor`` times its
    running median."""
    out = []
    for g, v in param_norms.items():
      if self.factor > 0 and math.isfinite(v) and self._norms[g]:
        med = float(np.median(self._norms[g]))
        if med > 0 and v > self.factor * med:
          out.append(g)
    return out


def blamed_groups(guard: DivergenceGuard, means: dict,
                  norms: dict) -> tuple[list[str], str]:
  """The parameter groups the numbers point at and why, first found of:
  NaN/Inf parameter norms, runaway parameter norms (one group's blown-up
  weights make every group's gradients NaN/Inf), NaN/Inf gradient norms
  (``nonfinite/<group>`` of the interval); ([], "") when none stands out."""
  for groups, why in (
      ([g for g, v in norms.items() if not math.isfinite(v)],
       "NaN/Inf parameters"),
      (guard.runaway_groups(norms),
       f"a parameter norm over {guard.factor:g}x its running median"),
      ([g for g in norms if means.get(f"nonfinite/{g}", 0.0) > 0],
       "NaN/Inf gradients")):
    if groups:
      return groups, why
  return [], ""


def advice(config, *, nonfinite: bool, lrs=()) -> str:
  """The knobs worth turning for this config (never one already turned).
  ``lrs``: the (optimizer section, its config key) of the groups to blame
  (default ``config.optimizer``'s)."""
  keys = {key: section for section, key in
          (lrs or [(config.optimizer, "config.optimizer")])}
  tips = [f"lower {key}.lr (now {section.lr:g})"
          for key, section in keys.items()]
  if not float(config.train.get("grad_clip", 0.0)) > 0:
    tips.append("enable gradient clipping (config.train.grad_clip=1.0)")
  tips += [f"add a warm-up ({key}.warmup_steps)"
           for key, section in keys.items()
           if not int(section.get("warmup_steps", 0) or 0)]
  dtype = str(config.get("model", {}).get("dtype", "float32"))
  if dtype in ("bfloat16", "float16"):
    tips.append(f"compute in float32 (config.model.dtype=float32; now {dtype})")
  if nonfinite:
    if config.train.get("check_finite", True):
      tips.append("or set config.train.check_finite=False to skip such "
                  "updates and keep training")
  else:
    tips.append("or, if this rise is expected, raise "
                "config.train.divergence_factor (0 turns the check off)")
  return "; ".join(tips) + "."


def diverged_message(what: str, first: int, last: int, checkpoint: str) -> str:
  """One message: what happened, in which steps, where to restart from."""
  return (f"Training diverged between steps {first} and {last}: {what}. "
          f"No checkpoint was written after step {first}; {checkpoint}.")


def check_health(config, guard: DivergenceGuard, means: dict, norms: dict,
                 acc_n: int, checked: int, done: int, ckpt,
                 resumed: int | None = None, optimizers=None) -> None:
  """Raises a TrainingDivergedError (NaN/Inf or runaway) for steps
  ``checked+1..done`` from the interval's mean metrics ``means`` (over
  ``acc_n`` steps) and parameter-group norms, naming the checkpoint of
  ``ckpt`` (a ``core.checkpoint.Checkpointer``) to restart from and the
  knobs. ``resumed``: the step this run resumed from (None: a fresh run);
  a divergence in the first updates after it names that step's files as a
  likely cause. ``optimizers``: the task's ``optimizer_configs()`` (group ->
  (section, key)), so the advice names the learning rate of the group that
  blew up (a discriminator's own, say)."""
  nonfinite = round(means.get("nonfinite", 0.0) * acc_n)
  what, cls = None, NonFiniteLossError
  if nonfinite and guard.check_finite:
    what = (f"the loss or gradients became NaN/Inf in {nonfinite} of the last "
            f"{acc_n} updates (each such update was skipped)")
  else:
    what = guard.nonfinite_params(norms)
  if what is None:
    what, cls = guard.runaway(means["loss"], norms), DivergenceError
  if what is None:
    return
  ckpt.wait()
  latest = ckpt.latest_step()
  if latest is None:
    where = "no checkpoint was written before; start again from a fresh --workdir"
  else:
    where = (f"the newest checkpoint, step {latest} ({ckpt.directory / str(latest)}), "
             "passed these checks before it was written (finite, sane "
             "parameters) and a restart with the same --workdir resumes from it")
    if resumed is not None and checked == resumed == latest:
      # It diverged at once on a state that was healthy when saved: the files
      # may have changed since (Orbax keeps no checksums of a step).
      where += (f". It diverged in the first updates after resuming from "
                f"step {latest}: if its files were damaged after they were "
                f"written (a bad copy, a disk fault), move "
                f"{ckpt.directory / str(latest)} out of checkpoints/ and rerun "
                "(the run then resumes from the step before)")
  groups, why = blamed_groups(guard, means, norms) if len(norms) > 1 else ([], "")
  if groups and "group" not in what:
    what += f"; {why} in parameter group(s) {', '.join(groups)}"
  lrs = [optimizers[g] for g in groups if g in (optimizers or {})]
  raise cls(diverged_message(what, checked, done, where) + " To fix: " +
            advice(config, nonfinite=cls is NonFiniteLossError, lrs=lrs))
