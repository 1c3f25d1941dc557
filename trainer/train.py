"""train_and_evaluate: the one training path for one device, many devices and many workers.

Read top-down: train_and_evaluate sets a run up (cluster, strategy, data, outputs, step,
checkpoint), _train runs chunks of steps and hands each result to the actions (trainer/actions.py),
and _finish evaluates, exports and writes metrics on the chief.
"""

import dataclasses
import logging
import os
import re
import threading
import time

import tensorflow as tf

from trainer import actions as actions_lib
from trainer import checkpoint as checkpoint_lib
from trainer.runtime import cluster as cluster_lib
from trainer import config as config_lib
from trainer import data
from trainer.runtime import distribute
from trainer import errors
from trainer import history
from trainer import outputs as outputs_lib
from trainer import phases as phases_lib
from trainer import run_shape
from trainer.runtime import preemption
from trainer import step as step_lib
from trainer.data import stream
from trainer.runtime import watchdog as watchdog_lib

# What a collective raises when a peer dies, times out or the coordination service gives up.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.CancelledError, tf.errors.AbortedError)


def train_and_evaluate(config: config_lib.Config, environ=None, cluster=None) -> dict:
  """Trains (resuming from model_dir when it holds a checkpoint), evaluates and exports.

  cluster: the ClusterInfo the entry point parsed from environ; None parses it here (a notebook,
  a test). Returns the metrics dict (the chief also writes it to model_dir/metrics.json).
  """
  environ = os.environ if environ is None else environ
  phases = phases_lib.Phases()
  if cluster is None:
    cluster = cluster_lib.parse_cluster(environ)  # Bad TF_CONFIG fails before any TF work.
  step_lib.set_precision_and_seeds(config.training)
  watchdog = watchdog_lib.Watchdog(cluster.peers(), config.runtime.collective_timeout_s, cluster.task_name,
                                 is_chief=cluster.is_chief)
  handler = preemption.PreemptionHandler(config.runtime.preemption_grace_s)
  store = outputs = source = None
  try:
    if cluster.is_multi_worker:
      watchdog_lib.rendezvous(cluster.address_of(cluster.task_type, cluster.task_index),
                            cluster.peers(), config.runtime.collective_timeout_s, cluster.task_name)
    # Before any other TF op. MultiWorkerMirroredStrategy waits here for every peer to join,
    # holding the GIL: hence holds_gil, which bounds it without the watchdog's thread.
    with watchdog.phase("strategy creation (every worker must join)", holds_gil=True):
      runtime = distribute.create_runtime(config.runtime, config.training.global_batch_size,
                                          cluster)
    # After the strategy: TF's coordination service installs its own SIGTERM handler.
    handler.install()
    phases.end("start-up")
    plan, splits = _load_data(config, runtime)
    source = plan.source
    phases.end("data")
    # Inputs are valid; now make sure the outputs can be written, still before any training.
    outputs = outputs_lib.RunOutputs(config.outputs, config.training,
                                     config.runtime.max_job_restarts, cluster.task_name, environ,
                                     runtime.is_chief)
    outputs.prepare()
    with watchdog.phase("model initialization (variables are broadcast from the chief)"):
      train_step = step_lib.TrainStep(config.model, config.optimizer, config.training, runtime,
                                      splits.image_shape, splits.num_classes, plan.total_steps)
    store = checkpoint_lib.CheckpointStore(
        train_step.checkpoint, outputs.paths.local_checkpoint_dir, runtime.is_chief,
        config.training.keep_checkpoints, remote_dir=outputs.paths.checkpoint_dir)
    store.restore_latest(outputs.paths.model_dir, config.outputs.restart_from_scratch)
    # A resumed run keeps what its order of examples depends on (exit 2 otherwise).
    store.check_run_shape(run_shape.of(config.data, config.training, runtime.num_workers,
                                       plan.pipelines, plan.record_files))
    start_step = int(train_step.step.numpy())
    outputs.begin(start_step)
    if runtime.is_chief:
      history.record_start(outputs.paths.checkpoint_dir, start_step, step_lib.policy_name())
    outputs.summaries.hparams(config, {"num_workers": runtime.num_workers,
                                       "num_replicas": runtime.num_replicas,
                                       "strategy": runtime.kind,
                                       "precision_policy": step_lib.policy_name()})
    run = _Run(config=config, runtime=runtime, splits=splits, plan=plan, outputs=outputs,
               train_step=train_step, store=store, watchdog=watchdog, handler=handler,
               total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
               start_step=start_step,
               # Chief-only: evaluation during and after training and the export use this copy.
               eval_model=step_lib.EvalModel(config.model, splits) if runtime.is_chief else None,
               phases=phases)
    phases.end("build")
    train_stats = _train(run)
    phases.end("train")
    return _finish(run, train_stats)
  except _PEER_ERRORS as e:
    if not cluster.is_multi_worker:
      raise
    raise errors.RetryableError(
        f"{cluster.task_name} lost contact with its peers (lost: {_lost_peers(cluster, e)})"
        f": {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
  except tf.errors.DataLossError as e:
    # Stream mode reads record files while training: a damaged one surfaces here.
    damaged = stream.find_damaged(source) if source is not None else ""
    raise errors.DataError(
        f"A training record file{' ' + damaged if damaged else ''} is damaged "
        f"({_data_loss_detail(e)}). Nothing was "
        "trained on it; the checkpoints are intact. Prepare the dataset again (a new --data_dir, "
        "or delete the dataset's folder in it), then rerun.") from None
  except (OSError, tf.errors.OpError) as e:
    if not errors.is_disk_full(e):
      raise
    where = getattr(e, "filename", None) or config.outputs.model_dir
    raise errors.StorageError(
        f"No space left on the device of {where}: free space and rerun the same command; the "
        "checkpoints saved so far are intact.") from None
  finally:
    handler.uninstall()
    watchdog.close()
    if store is not None:
      store.close()
    if outputs is not None:
      outputs.close()


@dataclasses.dataclass(frozen=True)
class _Run:
  """Everything train_and_evaluate set up, handed to the loop and the finish."""
  config: config_lib.Config
  runtime: distribute.Runtime
  splits: data.Splits
  plan: data.InputPlan  # the input mode, its steps and (stream mode) the files read here
  outputs: outputs_lib.RunOutputs
  train_step: step_lib.TrainStep
  store: checkpoint_lib.CheckpointStore
  watchdog: watchdog_lib.Watchdog
  handler: preemption.PreemptionHandler
  total_steps: int
  steps_per_epoch: int
  start_step: int
  eval_model: step_lib.EvalModel | None  # None on workers other than the chief
  phases: phases_lib.Phases


def _load_data(config, runtime) -> tuple:
  """(the input plan, the splits it holds in memory): the plan (mode, steps, files) is decided
  from the metadata, and the step budget checked, before anything is decoded."""
  plan = data.plan(config.data, config.training, runtime)
  # Only the chief evaluates: other workers neither read nor fetch the test split.
  splits = data.load(config.data, plan.builder, with_train=plan.mode == "in_memory",
                     with_test=runtime.is_chief)
  return plan, splits


def _train(run: _Run) -> dict:
  """Runs chunks of steps to the end, each followed by the actions; returns throughput figures."""
  config, step = run.config, run.start_step
  if step >= run.total_steps:
    logging.warning(
        "The checkpoint in %s is at step %d, and this run has %d steps: nothing to train. To "
        "train longer, raise --train_steps or --epochs; to start a fresh run, use a new "
        "--model_dir (or --restart_from_scratch).", run.outputs.paths.checkpoint_dir, step,
        run.total_steps)
    return {}
  logging.info("Training steps %d -> %d (%d per epoch, global batch %d, %d replica(s)).", step,
               run.total_steps, run.steps_per_epoch, config.training.global_batch_size,
               run.runtime.num_replicas)
  iterator = distribute.input_iterator(run.runtime, _train_input(run, step))
  if run.eval_model is not None:
    # Traced while the first chunk runs (step.EvalModel.warm_up), off the evaluations' clock.
    threading.Thread(target=run.eval_model.warm_up, name="eval-warm-up", daemon=True).start()
  profile = _profile_range(run)
  progress, boundary_actions, profiler = _actions(run, profile)
  # Every worker ends its chunks at the same steps (each chunk ends in a collective vote).
  chunker = actions_lib.Chunker(
      [config.training.log_every_steps, config.training.summary_every_steps, config.training.checkpoint_every_steps],
      config.training.steps_per_loop,
      run.total_steps, boundaries=actions_lib.profile_boundaries(profile),
      schedules=[_eval_schedule(config)])
  if profiler:
    profiler.start_at(step)  # a profile from step 1, or a run resumed inside the range
  try:
    while step < run.total_steps:
      result = _run_chunk(run, iterator, step, chunker.next_size(step))
      step = result.step
      for action in boundary_actions:
        action(result)
  finally:
    if profiler:
      profiler.close()
  return progress.stats()


def _train_input(run: _Run, start_step: int):
  """The input function of the run's mode; both continue exactly at start_step."""
  return data.train_input(run.plan, run.splits, run.config.data, run.config.training, start_step)


def _eval_schedule(config: config_lib.Config) -> actions_lib.Every:
  return actions_lib.Every(config.training.eval_every_steps, config.training.first_eval_step)


def _profile_range(run: _Run):
  """--profile_steps as (first, last), or None; also checked against a run set in epochs."""
  profile = config_lib.profile_range(run.config.training)
  if profile and profile[1] > run.total_steps:
    raise errors.ConfigError(
        f"--profile_steps={run.config.training.profile_steps}: END {profile[1]} is past the run's last "
        f"step ({run.total_steps}); choose steps within it.")
  return profile


def _actions(run: _Run, profile) -> tuple:
  """The progress logger, every action in the order it runs after a chunk, and the chief's
  profiler (None when not profiling)."""
  config = run.config
  saver = actions_lib.SaveCheckpoint(run.store, run.outputs, run.watchdog,
                                     config.training.checkpoint_every_steps, run.total_steps,
                                     run.start_step)
  progress = actions_lib.LogProgress(run.outputs.summaries, run.train_step.optimizer,
                                     config.training.log_every_steps, config.training.summary_every_steps,
                                     run.total_steps, config.training.global_batch_size)
  ordered = [actions_lib.StopOnDivergence(saver), actions_lib.PreemptionVote(saver), progress,
             saver]
  if run.runtime.is_chief:
    ordered.append(actions_lib.EvaluateOnTest(run.eval_model, run.train_step.model,
                                              run.outputs.summaries, _eval_schedule(config)))
  profiler = None
  if profile and run.runtime.is_chief:
    # Into the local log dir (a gs:// one's mirror, published with the other logs), beside the
    # scalars in train/: TensorBoard lists the profile under the run "train".
    profiler = actions_lib.ProfileSteps(os.path.join(run.outputs.paths.local_log_dir, "train"),
                                        *profile)
    # Stop first and start last, so the trace holds no checkpoint or evaluation at its edges.
    ordered = [profiler.stop, *ordered, profiler.start]
  return progress, ordered, profiler


def _run_chunk(run: _Run, iterator, step: int, num_steps: int) -> actions_lib.ChunkResult:
  """num_steps steps in one compiled call, with this worker's stop vote."""
  stop_vote = 1.0 if run.handler.requested.is_set() else 0.0
  tic = time.perf_counter()
  # A step marker for the profiler, as tf.profiler.experimental.Trace's docstring shows for
  # custom loops (a no-op unless a trace runs): each chunk is one "train" event, numbered by the
  # step it ends at. XProf's step-time pages need such markers; on CPU-only traces they still
  # report no step time (XProf 2.24), so they serve GPU runs (not run here) and the trace viewer.
  with run.watchdog.phase(watchdog_lib.TRAIN_PHASE), tf.profiler.experimental.Trace(
      "train", step_num=step + num_steps, _r=1):
    loss, correct, count, votes = run.train_step.train_chunk(
        iterator, tf.constant(num_steps), tf.constant(stop_vote))
    loss, correct, count, votes = float(loss), float(correct), float(count), float(votes)
  return actions_lib.ChunkResult(step=step + num_steps, steps=num_steps, loss=loss,
                                 correct=correct, count=count, stop_votes=votes,
                                 seconds=time.perf_counter() - tic)


def _finish(run: _Run, train_stats: dict) -> dict:
  """Metrics on every worker; the chief evaluates and hands the rest to its outputs."""
  runtime, train_step = run.runtime, run.train_step
  if not train_stats and runtime.is_chief:  # nothing trained: keep the last run's figures
    train_stats = run.outputs.previous_train_stats()
  metrics = {"global_step": int(train_step.step.numpy()), "start_step": run.start_step,
             "num_replicas": runtime.num_replicas, "num_workers": runtime.num_workers,
             "strategy": runtime.kind, "precision": step_lib.policy_name(),
             "train_images_per_sec": 0.0, "train_seconds": 0.0, **train_stats}
  weights = train_step.model.get_weights()
  metrics["weights_sha256"] = step_lib.weights_fingerprint(train_step.model)
  logging.info("Final step %d weights_sha256 %s", metrics["global_step"],
               metrics["weights_sha256"])
  if runtime.is_chief:
    final, predicted = run.eval_model.evaluate_with_predictions(weights)
    metrics.update(final)
    metrics.update(history.summary(run.outputs.paths.checkpoint_dir, metrics["global_step"],
                                   metrics["precision"]))
    run.phases.end("evaluate")
    logging.info("eval at step %d: test_accuracy %.4f test_loss %.4f (final)",
                 metrics["global_step"], metrics["test_accuracy"], metrics["test_loss"])
    summaries = run.outputs.summaries
    summaries.eval_scalars(metrics["global_step"], final)
    summaries.final_pictures(metrics["global_step"], run.splits.test_images,
                             run.splits.test_labels, predicted, run.splits.class_names)
    run.outputs.export(run.eval_model, weights, run.splits.image_shape, run.splits.class_names)
    run.phases.end("export")
    metrics.update(run.phases.as_metrics())
    run.outputs.finish(metrics)
    logging.info("test_accuracy %.4f test_loss %.4f; outputs in %s", metrics["test_accuracy"],
                 metrics["test_loss"], run.outputs.paths.model_dir)
  logging.info("%s", run.phases.summary())
  if runtime.kind == "multi_worker_mirrored":
    # Workers leave together, so nobody's coordination service sees a peer vanish early.
    with run.watchdog.phase("final barrier"):
      strategy = runtime.strategy
      strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)),
                      axis=None)
  return metrics


def _lost_peers(cluster, error) -> str:
  """Peers whose port is closed, else the tasks TensorFlow's error names, else 'unknown'."""
  lost = watchdog_lib.unreachable_peers(cluster.peers())
  if lost:
    return ", ".join(lost)
  # A stopped (SIGSTOP) or overloaded peer still accepts connections; the collective's error
  # names the task it gave up on, e.g. /job:worker/replica:0/task:1.
  named = sorted({f"{t}:{i}" for t, i in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)",
                                                      str(error))} - {cluster.task_name})
  if named:
    return ", ".join(f"{n} (its port answers but it does not: stopped or overloaded?)"
                     for n in named)
  return "unknown: every peer's port still answers; one may be stopped or overloaded"


def _data_loss_detail(error) -> str:
  """The lines of a DataLossError that say what is damaged (its first line is often generic)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  useful = [l for l in lines if "corrupt" in l.lower() or ".tfrecord" in l or "DATA_LOSS" in l]
  return "; ".join(useful or lines)[:500]
