"""`python -m deploy.k8s`: prints the manifests (deploy/k8s/__init__.py) for kubectl apply."""

import json
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags

from deploy import k8s
from trainer import options as option_flags

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> Optional[int]:
  try:
    o = _options_from_flags(argv[1:])
  except k8s.ManifestError as e:
    sys.stderr.write(f"deploy.k8s: error: {e}\n")
    return 2
  print(json.dumps(k8s.manifest(o, FLAGS.network_policy), indent=2))
  if o.gcp_service_account:
    sys.stderr.write(f"deploy.k8s: let the KSA act as the Google service account:\n"
                     f"  {k8s.workload_identity_binding_command(o)}\n")
  return 0


def _define_flags() -> None:
  """Defined only when run as a program, so tests can import the package next to others."""
  option_flags.define_flags(k8s.Options)
  flags.DEFINE_boolean("network_policy", False,
                       "Emit a List with the job's NetworkPolicy before the job.")


def _options_from_flags(extra_args: Sequence[str]) -> k8s.Options:
  return k8s.Options(**option_flags.values_from_flags(k8s.Options, FLAGS,
                                                      error=k8s.ManifestError),
                     trainer_args=tuple(extra_args))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
