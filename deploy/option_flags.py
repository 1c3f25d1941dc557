"""absl flags generated from a deploy Options dataclass: one flag per field, help in its metadata.

The dataclass is the single source of a field's name, type, default and help, as trainer.config
is for the trainer's flags, so a new option cannot be added to the spec and forgotten on the
command line (tests/deploy_option_flags_test.py checks every deploy entry point).
"""

import dataclasses
from typing import Sequence

from absl import flags

# Flags defined here belong to the program that calls define_flags, so --helpshort lists them.
flags.disclaim_key_flags()


def option(default=dataclasses.MISSING, help: str = "", **kwargs) -> dataclasses.Field:  # noqa: A002
  """A dataclass field carrying its flag's help text; no default means a required flag."""
  return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def define_flags(options_cls, flag_values=flags.FLAGS, skip: Sequence[str] = ()) -> None:
  """Defines one flag per field of options_cls that has help text and is not in skip."""
  where = {"flag_values": flag_values}
  for field in flag_fields(options_cls, skip):
    help_text = field.metadata["help"]
    default = None if field.default is dataclasses.MISSING else field.default
    if isinstance(default, bool):
      flags.DEFINE_boolean(field.name, default, help_text, **where)
    elif isinstance(default, int):
      flags.DEFINE_integer(field.name, default, help_text, **where)
    elif isinstance(default, float):
      flags.DEFINE_float(field.name, default, help_text, **where)
    elif isinstance(default, tuple):
      flags.DEFINE_list(field.name, [str(v) for v in default], help_text, **where)
    else:
      flags.DEFINE_string(field.name, default, help_text, **where)


def values_from_flags(options_cls, flag_values=flags.FLAGS, skip: Sequence[str] = (),
                      error=ValueError) -> dict:
  """The Options keyword arguments the parsed flags give; an unset required flag gives ""."""
  values = {}
  for field in flag_fields(options_cls, skip):
    value = flag_values[field.name].value
    if field.default is dataclasses.MISSING:
      value = value or ""  # validate() names the missing flag and the fix
    elif isinstance(field.default, tuple):
      value = _ints(field.name, value, error)
    values[field.name] = value
  return values


def flag_fields(options_cls, skip: Sequence[str] = ()) -> list:
  """The fields that are flags: those declared with option(help=...), minus skip."""
  return [f for f in dataclasses.fields(options_cls)
          if f.metadata.get("help") and f.name not in skip]


def _ints(name: str, value, error) -> tuple:
  try:
    return tuple(int(v) for v in value)
  except ValueError:
    raise error(f"--{name} must be comma-separated integers, got {','.join(value)}.") from None
