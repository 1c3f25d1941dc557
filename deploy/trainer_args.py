"""Checks on the trainer arguments that operators pass through the deploy tools."""

from typing import Optional, Sequence


class ArgsError(ValueError):
  """Trainer arguments that contradict what the deploy tool sets itself."""


def _name_of(arg: str) -> Optional[str]:
  if not arg.startswith("-"):
    return None
  return arg.lstrip("-").split("=", 1)[0]


def flag_value(args: Sequence[str], name: str) -> Optional[str]:
  """The last value given for --name (absl keeps the last one), or None when absent."""
  value = None
  for i, arg in enumerate(args):
    if _name_of(arg) != name:
      continue
    if "=" in arg:
      value = arg.split("=", 1)[1]
    elif i + 1 < len(args):
      value = args[i + 1]
  return value


def reject(args: Sequence[str], names: Sequence[str], why: str) -> None:
  """Raises ArgsError when any of --names appears in args; why tells the operator the fix."""
  for arg in args:
    name = _name_of(arg)
    # absl's --noflag form of a boolean sets the flag too.
    if name in names or (name and name.startswith("no") and name[2:] in names):
      raise ArgsError(f"Trainer argument {arg!r} is not allowed here: {why}")


def trainer_default(name: str):
  """The trainer's default for a flag, from its Config dataclass (the flags' single source)."""
  from trainer import config  # Lazy: only the checks that need a default pay for the import.
  return config.default(name)
