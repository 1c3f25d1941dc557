"""Tests for trainer.config: validation, step resolution and flag parsing."""

import re

import pytest

from trainer import config as config_lib
from trainer import errors


def test_defaults_are_valid():
  c = config_lib.Config(epochs=2)
  assert c.data.dataset == "mnist" and c.runtime.strategy == "auto"


def test_config_is_frozen():
  c = config_lib.Config(epochs=1)
  with pytest.raises(Exception):
    c.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("overrides, flag", [
    (dict(global_batch_size=0), "--global_batch_size"),
    (dict(global_batch_size=-8), "--global_batch_size"),
    (dict(train_steps=0), "--train_steps"),
    (dict(epochs=-1), "--epochs"),
    (dict(learning_rate=0.0), "--learning_rate"),
    (dict(strategy="parameter_server"), "--strategy"),
    (dict(dropout=1.0), "--dropout"),
    (dict(model_widths=()), "--model_widths"),
    (dict(model_widths=(8, 16), kernel_sizes=(3,)), "--kernel_sizes"),
    (dict(kernel_sizes=(5, 0)), "--kernel_sizes"),
    (dict(conv_padding="full"), "--conv_padding"),
    (dict(pool_sizes=(2,)), "--pool_sizes"),
    (dict(pool_sizes=(2, 0)), "--pool_sizes"),
    (dict(space_to_depth=0), "--space_to_depth"),
    (dict(adam_beta1=1.0), "--adam_beta1"),
    (dict(adam_beta2=-0.1), "--adam_beta2"),
    (dict(num_cpu_devices=2, strategy="one_device"), "--num_cpu_devices"),
    (dict(checkpoint_every_steps=0), "--checkpoint_every_steps"),
    (dict(precision="bfloat16"), "--precision"),
])
def test_bad_values_name_the_flag(overrides, flag):
  values = dict(epochs=1)
  values.update(overrides)
  with pytest.raises(errors.ConfigError, match=flag):
    config_lib.Config(**values)


def test_steps_or_epochs_required():
  with pytest.raises(errors.ConfigError, match="--train_steps or --epochs"):
    config_lib.Config()


def test_resolve_steps():
  assert config_lib.resolve_steps(config_lib.Config(epochs=2).training, 469) == 938
  assert config_lib.resolve_steps(config_lib.Config(train_steps=7).training, 469) == 7
  assert config_lib.resolve_steps(config_lib.Config(train_steps=938, epochs=2).training, 469) == 938
  with pytest.raises(errors.ConfigError, match="contradicts --epochs=2 "):
    config_lib.resolve_steps(config_lib.Config(train_steps=900, epochs=2).training, 469)
  # Fractional epochs: a started step runs whole.
  assert config_lib.resolve_steps(config_lib.Config(epochs=1.5).training, 235) == 353
  assert config_lib.resolve_steps(config_lib.Config(epochs=0.5).training, 470) == 235
  with pytest.raises(errors.ConfigError, match="--epochs must be at most"):
    config_lib.Config(epochs=1e300)


def _parse(argv):
  from absl import flags
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(["prog", *argv])
  return fv


@pytest.mark.parametrize("argv, expected", [
    ([], "auto"),
    (["--precision=float32"], "float32"),
    (["--precision=mixed"], "mixed"),
    (["--mixed_precision"], "mixed"),  # the old spelling still works
    (["--nomixed_precision"], "float32"),
    (["--mixed_precision", "--precision=mixed"], "mixed"),
])
def test_precision_flag_and_its_old_spelling(argv, expected):
  assert config_lib.config_from_flags(_parse(argv), environ={}).training.precision == expected


@pytest.mark.parametrize("argv", [["--mixed_precision", "--precision=float32"],
                                  ["--nomixed_precision", "--precision=auto"]])
def test_old_precision_flag_contradicting_the_new_one_is_an_error(argv):
  with pytest.raises(errors.ConfigError, match="contradicts --precision=.*give only --precision"):
    config_lib.config_from_flags(_parse(argv), environ={})


def test_config_from_flags_and_env():
  c = config_lib.config_from_flags(_parse(["--model_widths=4,8", "--train_steps=5"]),
                                   environ={"AIP_MODEL_DIR": "gs://b/model"})
  assert c.model.model_widths == (4, 8) and c.training.train_steps == 5 and c.training.epochs is None
  assert c.outputs.model_dir == "gs://b/model"
  c2 = config_lib.config_from_flags(_parse(["--model_dir=/tmp/x"]),
                                    environ={"AIP_MODEL_DIR": "gs://b/model"})
  assert c2.outputs.model_dir == "/tmp/x", "an explicit flag wins over the environment"
  assert c2.training.epochs == 1.0, "the default recipe: one epoch"


def test_kernel_and_pool_sizes_follow_model_widths_unless_given():
  deeper = config_lib.config_from_flags(_parse(["--model_widths=8,16,32"]), environ={})
  assert deeper.model.kernel_sizes == (3, 3, 3), "extra blocks reuse the last default kernel size"
  assert deeper.model.pool_sizes == (1, 2, 2)
  one = config_lib.config_from_flags(_parse(["--model_widths=8"]), environ={})
  assert (one.model.kernel_sizes, one.model.pool_sizes) == ((3,), (1,))
  given = config_lib.config_from_flags(_parse(["--model_widths=8,16", "--pool_sizes=1,2"]),
                                       environ={})
  assert given.model.pool_sizes == (1, 2)
  with pytest.raises(errors.ConfigError, match="--pool_sizes"):
    config_lib.config_from_flags(_parse(["--model_widths=8,16,32", "--pool_sizes=1,2"]),
                                 environ={})
  with pytest.raises(errors.ConfigError, match="--kernel_sizes"):
    config_lib.config_from_flags(_parse(["--model_widths=8,16,32", "--kernel_sizes=3,3"]),
                                 environ={})


def test_bad_model_widths_flag():
  with pytest.raises(errors.ConfigError, match="--model_widths"):
    config_lib.config_from_flags(_parse(["--model_widths=4,x"]), environ={})


def test_test_hooks_are_not_flags_but_environment_variables():
  from absl import flags as absl_flags
  values = absl_flags.FlagValues()
  config_lib.define_flags(values)
  values(["prog", "--epochs=1"])
  assert "inject_nan_at_step" not in values
  assert config_lib.config_from_flags(values, environ={}).training.inject_nan_at_step == 0
  hooked = config_lib.config_from_flags(values, environ={"TRAINER_INJECT_NAN_AT_STEP": "7"})
  assert hooked.training.inject_nan_at_step == 7
  with pytest.raises(errors.ConfigError, match="TRAINER_INJECT_NAN_AT_STEP"):
    config_lib.config_from_flags(values, environ={"TRAINER_INJECT_NAN_AT_STEP": "x"})


@pytest.mark.parametrize("kw, message", [
    (dict(input_mode="stream", train_examples=5), "--train_examples takes a subset"),
    (dict(input_mode="disk"), "--input_mode='disk'"),
    (dict(in_memory_limit_mb=0), "--in_memory_limit_mb must be > 0"),
    (dict(shuffle_buffer=0), "--shuffle_buffer must be > 0"),
    (dict(num_shards=-1), "--num_shards must be >= 0"),
])
def test_input_mode_flags_are_checked(kw, message):
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_lib.Config(epochs=1, **kw)
