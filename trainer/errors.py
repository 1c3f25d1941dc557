"""Error types and the process exit-code contract shared by the trainer, launcher and job specs."""

import errno

# Exit-code contract (README "Exit codes"; deploy/ restart policies depend on these numbers).
# 1-127 are permanent: Kubernetes TFJob `restartPolicy: ExitCode` does not retry them.
# 143 (128 + SIGTERM) is retryable: Kubeflow and Vertex AI restart the job.
EXIT_OK = 0
EXIT_UNEXPECTED = 1  # an uncaught bug; permanent, so a crash loop is never automatic
EXIT_CONFIG = 2  # bad or contradictory flags, TF_CONFIG or environment
EXIT_DATA = 3  # missing, unreadable or corrupt input data
EXIT_INCOMPATIBLE_CHECKPOINT = 4  # model_dir holds a checkpoint of another model
EXIT_DIVERGED = 5  # NaN or inf loss
EXIT_STORAGE = 6  # permanent storage error (403, missing bucket, disk full)
EXIT_RESTARTS_EXHAUSTED = 7  # started more than --max_job_restarts times without finishing
EXIT_RETRYABLE = 143  # preempted (SIGTERM) or a peer was lost: rerun the same command

PERMANENT_EXIT_CODES = (EXIT_UNEXPECTED, EXIT_CONFIG, EXIT_DATA,
                        EXIT_INCOMPATIBLE_CHECKPOINT, EXIT_DIVERGED, EXIT_STORAGE,
                        EXIT_RESTARTS_EXHAUSTED)


class TrainerError(Exception):
  """An error with a message for the user and the exit code it maps to."""

  exit_code = EXIT_UNEXPECTED


class ConfigError(TrainerError):
  exit_code = EXIT_CONFIG


class DataError(TrainerError):
  exit_code = EXIT_DATA


class IncompatibleCheckpointError(TrainerError):
  exit_code = EXIT_INCOMPATIBLE_CHECKPOINT


class DivergenceError(TrainerError):
  exit_code = EXIT_DIVERGED


class StorageError(TrainerError):
  exit_code = EXIT_STORAGE


class RestartsExhaustedError(TrainerError):
  """The platform kept restarting a job that never finished: stop the loop for good."""

  exit_code = EXIT_RESTARTS_EXHAUSTED


class RetryableError(TrainerError):
  """Preemption or a lost peer: the platform should rerun the same command."""

  exit_code = EXIT_RETRYABLE


def is_disk_full(error: Exception) -> bool:
  """True for ENOSPC/EDQUOT, as an OSError or in the text of a TensorFlow error."""
  if isinstance(error, OSError) and error.errno is not None:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
  return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)
