"""Deploy flags come from the Options dataclasses: every option is a flag, with its default."""

import dataclasses

import pytest
from absl import flags

from deploy import k8s
from trainer import options as option_flags
from deploy import vertex

PLATFORMS = [
    (vertex.Options, vertex.SpecError, {"output_dir": "gs://b/out"}),
    (k8s.Options, k8s.ManifestError, {"image": "img:1", "model_dir": "gs://b/m"}),
]


def _parsed(options_cls, argv):
  flag_values = flags.FlagValues()
  option_flags.define_flags(options_cls, flag_values)
  flag_values(["prog", *argv])
  return flag_values


@pytest.mark.parametrize("options_cls,error,required", PLATFORMS)
def test_every_option_but_trainer_args_is_a_flag(options_cls, error, required):
  flag_values = _parsed(options_cls, [])
  names = {f.name for f in dataclasses.fields(options_cls)} - {"trainer_args"}
  assert names <= set(flag_values)
  for name in names:
    assert flag_values[name].help, f"--{name} has no help text"


@pytest.mark.parametrize("options_cls,error,required", PLATFORMS)
def test_flag_defaults_build_the_dataclass_defaults(options_cls, error, required):
  argv = [f"--{k}={v}" for k, v in required.items()]
  from_flags = options_cls(**option_flags.values_from_flags(options_cls, _parsed(options_cls,
                                                                                  argv)))
  assert from_flags == options_cls(**required)


@pytest.mark.parametrize("options_cls,error,required", PLATFORMS)
def test_a_missing_required_flag_is_named(options_cls, error, required):
  with pytest.raises(error, match=f"--{next(iter(required))}"):
    options_cls(**option_flags.values_from_flags(options_cls, _parsed(options_cls, [])))


def test_flags_set_the_typed_fields():
  argv = ["--output_dir=gs://b/out", "--workers=4", "--spot", "--lr_max=0.05",
          "--batch_sizes=32,64"]
  o = vertex.Options(**option_flags.values_from_flags(vertex.Options,
                                                      _parsed(vertex.Options, argv)))
  assert (o.workers, o.spot, o.lr_max, o.batch_sizes) == (4, True, 0.05, (32, 64))


def test_non_integer_list_names_the_flag():
  flag_values = _parsed(vertex.Options, ["--output_dir=gs://b/out", "--batch_sizes=32,big"])
  with pytest.raises(vertex.SpecError, match="--batch_sizes must be comma-separated integers"):
    option_flags.values_from_flags(vertex.Options, flag_values, error=vertex.SpecError)
