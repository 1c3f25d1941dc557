"""absl flags generated from frozen dataclasses: one flag per field, its help in the field's
metadata. The trainer's Config groups and every deploy/ Options class use this one generator, so a
field cannot be added and forgotten on the command line, and help text is written once.
"""

import dataclasses
from typing import Sequence

from absl import flags

# Flags defined here belong to the program that calls define_flags, so --helpshort lists them.
flags.disclaim_key_flags()


def option(default=dataclasses.MISSING, help: str = "", choices: Sequence[str] = (),  # noqa: A002
           flag_type=None, **kwargs) -> dataclasses.Field:
  """A dataclass field carrying its flag's help text (no help: not a flag, e.g. a test hook).

  No default means a required flag. choices makes an enum flag; flag_type (int or float) types
  a flag whose default is None (e.g. --train_steps, unset unless given). A tuple default is a
  comma-separated list of integers.
  """
  metadata = {"help": help, "choices": tuple(choices), "flag_type": flag_type}
  return dataclasses.field(default=default, metadata=metadata, **kwargs)


def define_flags(options_cls, flag_values=flags.FLAGS, skip: Sequence[str] = ()) -> None:
  """Defines one flag per field of options_cls that has help text and is not in skip."""
  where = {"flag_values": flag_values}
  for field in flag_fields(options_cls, skip):
    help_text = field.metadata["help"]
    default = None if field.default is dataclasses.MISSING else field.default
    kind = field.metadata.get("flag_type") or type(default)
    if field.metadata.get("choices"):
      flags.DEFINE_enum(field.name, default, field.metadata["choices"], help_text, **where)
    elif kind is bool:
      flags.DEFINE_boolean(field.name, default, help_text, **where)
    elif kind is int:
      flags.DEFINE_integer(field.name, default, help_text, **where)
    elif kind is float:
      flags.DEFINE_float(field.name, default, help_text, **where)
    elif kind is tuple:
      flags.DEFINE_list(field.name, [str(v) for v in default], help_text, **where)
    else:
      flags.DEFINE_string(field.name, default, help_text, **where)


def values_from_flags(options_cls, flag_values=flags.FLAGS, skip: Sequence[str] = (),
                      error=ValueError) -> dict:
  """The keyword arguments the parsed flags give; an unset required flag gives ""."""
  values = {}
  for field in flag_fields(options_cls, skip):
    value = flag_values[field.name].value
    if field.default is dataclasses.MISSING:
      value = value or ""  # validation names the missing flag and the fix
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
