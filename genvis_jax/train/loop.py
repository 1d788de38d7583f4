"""The steps of a training run, from its restored or initialised state.

``run_steps`` is ``train_loop``'s body once the mesh, data, state and
checkpointer exist (``train/trainer.py``): per step the jitted step, and at
their intervals the health checks, logs, grids, checkpoints and the stop on
a signal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import errors, models
from genvis_jax.core import flops as flops_lib
from genvis_jax.core import metrics as metrics_lib
from genvis_jax.core import preemption
from genvis_jax.core import profiling
from genvis_jax.core import settings as settings_lib
from genvis_jax.train import grids
from genvis_jax.train import guard as guard_lib
from genvis_jax.train import log_step
from genvis_jax.train import replicas
from genvis_jax.train import step as step_lib


def run_steps(config, workdir, trainer, ckpt, state, data_iter, info,
              data_seed, on_log, start_up):
  """Steps from ``state``'s to ``config.train.num_steps``: logs, health
  checks, grids, checkpoints and the stop on a signal (``start_up``'s until
  the loop begins). Returns the state."""
  start = int(jax.device_get(state.step))
  num_steps = int(config.train.num_steps)
  n_params = {g: models.count_params(p) for g, p in state.params.items()}
  # Epochs as the data counts them: a batch override keeps the recipe's
  # steps (FAR's 300 epochs at batch 256), so say what the run amounts to.
  epochs = num_steps / max(int(info.steps_per_epoch), 1)
  logging.info("Parameters: %s; mesh %s; start step %d of %d (%.4g epochs of "
               "%d examples at global batch %d)", n_params,
               dict(trainer.mesh.shape), start, num_steps, epochs,
               info.num_examples, int(config.train.global_batch_size))
  if start >= num_steps:
    logging.warning("Training already finished: %s holds step %d of "
                    "config.train.num_steps=%d. Raise --config.train.num_steps "
                    "to train further.", ckpt.directory, start, num_steps)

  # TensorBoard drops the points of the steps a resume redoes.
  metrics_lib.mark_start(workdir, start)
  writer = metrics_lib.create_writer(workdir)
  # At every start (a resume may change num_steps, the schedule ...);
  # sequences as text (they were left out).
  writer.write_hparams({
      k: v if isinstance(v, (int, float, str, bool)) else str(v)
      for k, v in settings_lib.flatten(config.to_dict()).items()})
  progress = metrics_lib.Progress(start, num_steps)
  guard = guard_lib.DivergenceGuard(
      config.train.get("divergence_factor", guard_lib.DEFAULT_DIVERGENCE_FACTOR),
      config.train.get("check_finite", True))
  guard.record(None, trainer.param_norms(state))
  log = log_step.Logger(writer, guard, progress, info, num_steps, on_log,
                        trainer.task, int(config.train.global_batch_size),
                        trainer.data_group, flops=lambda: trainer.step_flops,
                        peak_tflops=flops_lib.peak_tflops(
                            jax.devices()[0].device_kind,
                            config.train.get("peak_tflops")))
  group_check = replicas.GroupCheck(trainer.data_group)
  checked = start   # last step whose state passed the health checks
  acc, acc_n = None, 0
  visuals = grids.Schedule(trainer, writer, workdir, config.train.image_every,
                           num_steps)
  profile = profiling.StepWindow(
      workdir, start, int(config.train.get("profile_steps", 0)),
      int(config.train.get("profile_skip_steps", 5)), settle=ckpt.wait)
  try:
    # SIGTERM / Ctrl-C: finish the step in flight, save it, stop.
    with preemption.StopRequest(resumes=ckpt.resume_note) as stop, profile:
      start_up.take_over()
      for step in range(start, num_steps):
        local = next(data_iter)
        group_check.update(local)
        visuals.start(state, local, step)
        with profile.step(step):
          state, metrics = trainer.step(state, local)
        profile.done(step, metrics)
        done = step + 1
        if step == start:
          # Rates and ETAs count from here: the first step compiled (a log
          # at this step gives none).
          jax.block_until_ready(metrics)
          logging.info("First step (compilation included) took %.1f s.",
                       progress.restart(done))
        acc = metrics if acc is None else _add_metrics(acc, metrics)
        acc_n += 1
        stop_now = stop.should_stop(done)     # every step, on every process
        # A stop logs the steps since the last log: the resume's first log
        # covers only its own, so nothing else would.
        log_now = (done % config.train.log_every == 0 or done == num_steps
                   or stop_now)
        save_now = (done % config.train.checkpoint_every == 0 or done == num_steps
                    or stop_now)
        # A failed background save stops the run at the first step after its
        # write ends (the write overlaps the steps until then; the next save
        # waits for it). Several processes agree at log and save steps, so
        # all stop at the same one.
        if jax.process_count() == 1 or log_now or save_now:
          ckpt.check(at_step=done, agree=True)
        if log_now or save_now:
          group_check.check(done)
          # Health checks on what logging fetches anyway, and always right before
          # a save, so a diverged state is never written as a checkpoint.
          means = step_lib.interval_means(jax.device_get(acc), acc_n)
          norms = trainer.param_norms(state)
          guard_lib.check_health(config, guard, means, norms, acc_n,
                                 checked, done, ckpt,
                                 resumed=start if start else None,
                                 optimizers=trainer.task.optimizer_configs())
          checked = done
        if log_now:
          log(done, means, norms, acc_n)
          acc, acc_n = None, 0
        if stop_now:
          visuals.skip(done)
        elif visuals.due(done):
          # The step in flight is training time: waited for before the
          # grid's time is taken out (on a step that did not log, the grid
          # waited for it, and steps/s counted half the steps' time).
          with progress.off_the_clock(state):
            visuals.draw(state, done)
        if save_now:
          # As the grids: the save's foreground (copying the state off the
          # devices, waiting for the previous write) is not training time.
          with progress.off_the_clock(state):
            ckpt.save(done, state, data_iter, config, data_seed=data_seed,
                      data_group=trainer.data_group,
                      data_listing=info.listing())
        if stop_now and done < num_steps:
          ckpt.close()
          writer.flush()
          raise preemption.TrainingStopped(
              f"Training stopped by {stop.signal} after step {done} of "
              f"{num_steps}; the checkpoint of step {done} is saved in "
              f"{ckpt.directory}. Run the same command to resume from it.",
              stop.signum)
  except BaseException as e:
    # A save started before the error still completes (and is checked):
    # a multi-host process exits at once after an error (cli.exit_now). So
    # after a KeyboardInterrupt (a notebook's second Ctrl-C; the command
    # line's ends the process in the handler): the workdir lock is let go
    # next, and a rerun would remove the half-written step as an unfinished
    # save's leftovers and resume from the step before it.
    if not isinstance(e, Exception) and ckpt.in_flight() is not None:
      logging.warning("Stopping: waiting for the checkpoint of step %d, "
                      "still being written (Ctrl-C again stops without it).",
                      ckpt.in_flight())
    _finish_saves(ckpt, writer)
    raise
  ckpt.close()
  visuals.finish(state)
  writer.flush()
  return state


@functools.partial(jax.jit, donate_argnums=0)
def _add_metrics(total, metrics):
  """Running sums of the step metrics: one dispatch per step (summed leaf
  by leaf, eagerly, each would be its own launch over the mesh)."""
  return jax.tree_util.tree_map(jnp.add, total, metrics)


def _finish_saves(ckpt, writer) -> None:
  """Waits for the checkpoint save in flight and flushes the metric writer;
  a failure here is logged, not raised (the error being raised matters more)."""
  try:
    ckpt.wait()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("The checkpoint save in flight failed too: %s",
                  errors.first_line(e))
  try:
    writer.flush()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("Writing the metrics failed too: %s", errors.first_line(e))
