"""Checks a rendered Kubernetes manifest the way the cluster would, without a cluster.

- validation_errors(): the object against the openAPIV3Schema of the CRDs of named releases in
  tests/k8s_schemas/ (README there: repository, path, tag, commit, sha256), made strict
  (additionalProperties false wherever the CRD lists properties and does not preserve unknown
  fields, so a misspelt field is an error instead of being pruned), int32/int64 ranges checked;
  ObjectMeta, pod and Job templates and env lists against the `kubernetes` client's models
  (round-tripped: a field the model does not know is dropped, and that is an error); and the
  admission rules below, re-stated from the sources named beside them. CEL rules
  (x-kubernetes-validations) in the CRDs are not evaluated.
- pod_environment(): the environment Kubernetes gives a container of a rendered JobSet pod.
"""

import copy
import functools
import gzip
import inspect
import json
import pathlib
import re

import jsonschema
import yaml

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent / "k8s_schemas"
# (apiVersion, kind) -> the CRD files of the releases every manifest must satisfy.
RELEASES = {
    ("kubeflow.org/v1", "TFJob"): ["training-operator-v1.9.2.tfjobs.yaml.gz",
                                   "training-operator-v1.9.4.tfjobs.yaml.gz"],
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): ["jobset-v0.11.0.jobsets.yaml.gz",
                                             "jobset-v0.12.0.jobsets.yaml.gz"],
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): [
        "trainer-v2.2.0.clustertrainingruntimes.yaml.gz",
        "trainer-v2.3.0.clustertrainingruntimes.yaml.gz"],
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): ["trainer-v2.2.0.trainjobs.yaml.gz",
                                                    "trainer-v2.3.0.trainjobs.yaml.gz"],
}
_INT_FORMATS = {"int32": 2**31, "int64": 2**63}
_FORMATS = jsonschema.FormatChecker()
for _name, _bound in _INT_FORMATS.items():
  _FORMATS.checks(_name)(lambda v, b=_bound: not isinstance(v, int) or -b <= v < b)


def validation_errors(obj: dict) -> list:
  """Every reason the API server or an admission webhook of the named releases would refuse
  `obj` (a List is checked item by item); [] when there is none."""
  if obj.get("kind") == "List":
    return [e for item in obj["items"] for e in validation_errors(item)]
  errors = []
  key = (obj.get("apiVersion"), obj.get("kind"))
  for filename in RELEASES.get(key, ()):
    validator = jsonschema.Draft7Validator(strict_schema(filename, key[0].split("/")[-1]),
                                           format_checker=_FORMATS)
    errors += [f"{filename}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
               for e in validator.iter_errors(obj)]
  errors += model_errors(obj.get("metadata", {}), "V1ObjectMeta", "metadata")
  for path, template, model in _templates(obj):
    errors += model_errors(template, model, path)
  errors += _admission_errors(obj)
  return errors


@functools.lru_cache(maxsize=None)
def crd(filename: str) -> dict:
  with gzip.open(SCHEMA_DIR / filename) as f:
    return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=None)
def strict_schema(filename: str, version: str) -> dict:
  """The CRD version's openAPIV3Schema with additionalProperties false where the API server
  would prune unknown fields: objects that list properties and keep no unknown fields."""
  [served] = [v for v in crd(filename)["spec"]["versions"] if v["name"] == version]
  schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
  _close(schema)
  return schema


def _close(node) -> None:
  if isinstance(node, list):
    for item in node:
      _close(item)
    return
  if not isinstance(node, dict):
    return
  if ("properties" in node and "additionalProperties" not in node
      and not node.get("x-kubernetes-preserve-unknown-fields")):
    node["additionalProperties"] = False
  for key, value in node.items():
    if key == "properties":
      for prop in value.values():
        _close(prop)
    elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
      _close(value)


def model_errors(value, model: str, path: str) -> list:
  """Deserializes `value` into the kubernetes client's `model` (e.g. V1PodTemplateSpec) and
  back: the client drops fields its model does not have, and refuses missing required ones."""
  from kubernetes import client  # pylint: disable=import-outside-toplevel

  api = client.ApiClient()
  text = json.dumps(value)
  # Newer clients (37 here) deserialize the response text; older ones read a response's .data.
  if "response_text" in inspect.signature(api.deserialize).parameters:
    args = (text, model, "application/json")
  else:
    args = (type("Response", (), {"data": text})(), model)
  try:
    back = api.sanitize_for_serialization(api.deserialize(*args))
  except (ValueError, TypeError) as e:
    return [f"{path} as {model}: {e}"]
  return [f"{path}{p}: {what} in the {model} round trip" for p, what in _differences(value, back)]


def _differences(a, b, path: str = "") -> list:
  """Where b lost or changed something of a; the client writes quantities as strings."""
  if isinstance(a, dict):
    if not isinstance(b, dict):
      return [(path, "not an object")]
    out = [(f"{path}/{k}", "dropped (unknown field)") for k in a if k not in b]
    return out + [d for k in a if k in b for d in _differences(a[k], b[k], f"{path}/{k}")]
  if isinstance(a, list):
    if not isinstance(b, list) or len(a) != len(b):
      return [(path, "list changed")]
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}/{i}")]
  if a != b and str(a) != str(b):
    return [(path, f"{a!r} became {b!r}")]
  return []


def _templates(obj: dict):
  """(path, value, kubernetes model) of the Kubernetes types embedded in our kinds."""
  kind, spec = obj.get("kind"), obj.get("spec", {})
  if kind == "TFJob":
    for rtype, replica in spec.get("tfReplicaSpecs", {}).items():
      yield f"spec/tfReplicaSpecs/{rtype}/template", replica["template"], "V1PodTemplateSpec"
  jobset_spec = {"JobSet": spec,
                 "ClusterTrainingRuntime": spec.get("template", {}).get("spec", {})}.get(kind)
  for i, rjob in enumerate((jobset_spec or {}).get("replicatedJobs", [])):
    yield f"replicatedJobs/{i}/template", rjob["template"], "V1JobTemplateSpec"
  if kind == "TrainJob":
    trainer = spec.get("trainer", {})
    for i, env in enumerate(trainer.get("env", [])):
      yield f"spec/trainer/env/{i}", env, "V1EnvVar"
    if "resourcesPerNode" in trainer:
      yield "spec/trainer/resourcesPerNode", trainer["resourcesPerNode"], "V1ResourceRequirements"


# ---- Admission rules that are code, not schema ----

def _admission_errors(obj: dict) -> list:
  kind, spec = obj.get("kind"), obj.get("spec", {})
  if kind == "JobSet":
    return _jobset_errors(obj["metadata"]["name"], spec)
  if kind == "ClusterTrainingRuntime":
    jobset_spec = spec["template"]["spec"]
    # The JobSet takes the TrainJob's name; check the names with a 40-character one, the
    # longest deploy/k8s allows.
    return _runtime_errors(jobset_spec) + _jobset_errors("a" * 40, jobset_spec)
  if kind == "TrainJob" and len(obj["metadata"]["name"]) > 63:
    # trainjob_types.go: XValidation size(self.metadata.name) <= 63.
    return ["TrainJob metadata.name must be no more than 63 characters"]
  return []


# Kubernetes pkg/apis/batch/validation/validation.go (maxPodFailurePolicyRules,
# maxPodFailurePolicyOnExitCodesValues, maxPodFailurePolicyOnPodConditionsPatterns).
_MAX_RULES, _MAX_EXIT_CODES, _MAX_CONDITIONS = 20, 255, 20
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# jobset pkg/webhooks/jobset_webhook.go: ruleNameFmt, validOnJobFailureReasons.
_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
                        "MaxFailedIndexesExceeded", "PodFailurePolicy"}


def _jobset_errors(name: str, spec: dict) -> list:
  """jobset v0.12.0 pkg/webhooks/jobset_webhook.go ValidateCreate (the checks a static
  manifest can fail), and each Job's podFailurePolicy as Kubernetes validates it."""
  errors = []
  rjob_names = [r["name"] for r in spec.get("replicatedJobs", [])]
  for rjob in spec.get("replicatedJobs", []):
    job_spec = rjob["template"]["spec"]
    longest_job = f"{name}-{rjob['name']}-{rjob.get('replicas', 1) - 1}"
    if len(longest_job) > 63 or not _DNS1035.match(longest_job):
      errors.append(f"JobSet: Job name {longest_job!r} is not a DNS-1035 label")
    if job_spec.get("completionMode") == "Indexed" and "completions" in job_spec:
      pod = f"{longest_job}-{job_spec['completions'] - 1}-abcde"
      if len(pod) > 63 or not _DNS1035.match(pod):
        errors.append(f"JobSet: pod name {pod!r} is not a DNS-1035 label")
    errors += _job_errors(rjob["name"], job_spec)
  if spec.get("replicatedJobs") and "dependsOn" in spec["replicatedJobs"][0]:
    errors.append("JobSet: DependsOn can't be set for the first ReplicatedJob")
  for target in spec.get("successPolicy", {}).get("targetReplicatedJobs", []):
    if target not in rjob_names:
      errors.append(f"JobSet: successPolicy names unknown replicated job {target!r}")
  policy = spec.get("failurePolicy", {})
  if policy.get("restartStrategy") == "InPlaceRestart":
    errors.append("JobSet: InPlaceRestart needs a feature gate that is off by default")
  names = [rule.get("name", "") for rule in policy.get("rules", [])]
  if len(set(names)) != len(names):
    errors.append(f"JobSet: failure policy rule names are not unique: {names}")
  for rule in policy.get("rules", []):
    if not 1 <= len(rule.get("name", "")) <= 128 or not _RULE_NAME.match(rule.get("name", "")):
      errors.append(f"JobSet: invalid failure policy rule name {rule.get('name')!r}")
    errors += [f"JobSet: {r!r} is not a recognized job failure reason"
               for r in rule.get("onJobFailureReasons", []) if r not in _JOB_FAILURE_REASONS]
    errors += [f"JobSet: failure policy names unknown replicated job {t!r}"
               for t in rule.get("targetReplicatedJobs", []) if t not in rjob_names]
  return errors


def _job_errors(rjob: str, job_spec: dict) -> list:
  """Kubernetes pkg/apis/batch/validation/validation.go: validateJobSpec's podFailurePolicy
  part (validatePodFailurePolicy, validatePodFailurePolicyRule*), and Indexed completions."""
  where = f"replicated job {rjob!r}"
  errors = []
  pod_spec = job_spec["template"]["spec"]
  if job_spec.get("completionMode") == "Indexed" and job_spec.get("completions") is None:
    errors.append(f"{where}: an Indexed Job needs completions")
  if job_spec.get("backoffLimit", 0) < 0:
    errors.append(f"{where}: backoffLimit must be >= 0")
  policy = job_spec.get("podFailurePolicy")
  if policy is None:
    return errors
  if pod_spec.get("restartPolicy") != "Never":
    errors.append(f"{where}: only restartPolicy Never is supported with podFailurePolicy")
  rules = policy.get("rules", [])
  if len(rules) > _MAX_RULES:
    errors.append(f"{where}: more than {_MAX_RULES} podFailurePolicy rules")
  containers = {c.get("name") for c in pod_spec.get("containers", []) + pod_spec.get(
      "initContainers", [])}
  for i, rule in enumerate(rules):
    at = f"{where}: podFailurePolicy rule {i}"
    if rule.get("action") not in ("FailJob", "Ignore", "Count", "FailIndex"):
      errors.append(f"{at}: action {rule.get('action')!r} is not supported")
    if rule.get("action") == "FailIndex" and "backoffLimitPerIndex" not in job_spec:
      errors.append(f"{at}: FailIndex requires backoffLimitPerIndex")
    on_codes, on_conditions = rule.get("onExitCodes"), rule.get("onPodConditions")
    if (on_codes is None) == (not on_conditions):
      errors.append(f"{at}: specify exactly one of onExitCodes and onPodConditions")
    if on_codes is not None:
      errors += _exit_code_errors(at, on_codes, containers)
    for pattern in on_conditions or ():
      if pattern.get("status") not in ("True", "False", "Unknown"):
        errors.append(f"{at}: condition status {pattern.get('status')!r} is not supported")
    if len(on_conditions or ()) > _MAX_CONDITIONS:
      errors.append(f"{at}: more than {_MAX_CONDITIONS} onPodConditions")
  return errors


def _exit_code_errors(at: str, on_codes: dict, containers: set) -> list:
  errors = []
  if on_codes.get("operator") not in ("In", "NotIn"):
    errors.append(f"{at}: operator {on_codes.get('operator')!r} is not supported")
  if "containerName" in on_codes and on_codes["containerName"] not in containers:
    errors.append(f"{at}: containerName {on_codes['containerName']!r} is not a container")
  values = on_codes.get("values", [])
  if not values or len(values) > _MAX_EXIT_CODES:
    errors.append(f"{at}: 1 to {_MAX_EXIT_CODES} exit codes are required")
  if on_codes.get("operator") == "In" and 0 in values:
    errors.append(f"{at}: exit code 0 is not allowed with In")
  if len(set(values)) != len(values) or values != sorted(values):
    errors.append(f"{at}: exit codes must be unique and ordered")
  return errors


def _runtime_errors(jobset_spec: dict) -> list:
  """kubeflow/trainer v2.3.0 pkg/webhooks/trainingruntime_webhook.go validateReplicatedJobs:
  the replicated job labelled as the trainer ancestor has one replica and a "node" container."""
  errors = []
  for rjob in jobset_spec.get("replicatedJobs", []):
    labels = rjob["template"].get("metadata", {}).get("labels", {})
    if labels.get("trainer.kubeflow.org/trainjob-ancestor-step") != "trainer":
      continue
    if rjob.get("replicas", 1) != 1:
      errors.append(f"runtime: replicated job {rjob['name']!r} must have replicas 1")
    names = [c.get("name") for c in rjob["template"]["spec"]["template"]["spec"]["containers"]]
    if "node" not in names:
      errors.append(f"runtime: the trainer replicated job needs a container named node: {names}")
  return errors


# ---- The environment Kubernetes gives a JobSet pod's container ----

def pod_environment(jobset: dict, rjob_name: str, pod_index: int, job_index: int = 0,
                    restarts: int = 0) -> dict:
  """What a container of pod `pod_index` of Job `job_index` of replicated job `rjob_name`
  sees, as far as the manifest decides it: its env list with the downward-API values filled in
  from the labels JobSet puts on the pod (jobset pkg/controllers/jobset_controller.go
  labelAndAnnotateObject), JOB_COMPLETION_INDEX (Kubernetes pkg/controller/job/
  indexed_job_utils.go, addCompletionIndexEnvVariable, from the pod's completion-index
  annotation or label) and HOSTNAME, the pod's host name `<job name>-<index>`
  (job_controller.go) as the container runtime sets it."""
  name = jobset["metadata"]["name"]
  [rjob] = [r for r in jobset["spec"]["replicatedJobs"] if r["name"] == rjob_name]
  template = rjob["template"]["spec"]["template"]
  job_name = f"{name}-{rjob_name}-{job_index}"
  labels = dict(template["metadata"].get("labels", {}))
  labels.update({
      "jobset.sigs.k8s.io/jobset-name": name,
      "jobset.sigs.k8s.io/replicatedjob-name": rjob_name,
      "jobset.sigs.k8s.io/job-index": str(job_index),
      "jobset.sigs.k8s.io/replicatedjob-replicas": str(rjob.get("replicas", 1)),
      "jobset.sigs.k8s.io/restart-attempt": str(restarts),
      "batch.kubernetes.io/job-completion-index": str(pod_index),
  })
  annotations = dict(template["metadata"].get("annotations", {}), **labels)
  [container] = template["spec"]["containers"]
  env = {}
  for var in container.get("env", []):
    if "value" in var:
      env[var["name"]] = var["value"]
      continue
    field = var["valueFrom"]["fieldRef"]["fieldPath"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field)
    assert match, f"fieldRef {field} is not filled in here"
    source = labels if match.group(1) == "labels" else annotations
    # The downward API gives "" for a label the pod does not have.
    env[var["name"]] = source.get(match.group(2), "")
  env.setdefault("JOB_COMPLETION_INDEX", str(pod_index))
  env["HOSTNAME"] = f"{job_name}-{pod_index}"
  return env


# ---- What the controllers do with a manifest, as far as the pods see it ----

def pod_failure_action(job_spec: dict, exit_code: int, disrupted: bool = False):
  """The action of the first podFailurePolicy rule matching a pod whose one container exited
  `exit_code` (with the DisruptionTarget condition when `disrupted`); None when no rule
  matches, which Kubernetes counts (pkg/controller/job/pod_failure_policy.go,
  matchPodFailurePolicy: rules in order; exit code 0 never matches onExitCodes)."""
  [container] = job_spec["template"]["spec"]["containers"]
  for rule in job_spec["podFailurePolicy"]["rules"]:
    on_codes = rule.get("onExitCodes")
    if on_codes:
      if on_codes.get("containerName", container["name"]) != container["name"] or not exit_code:
        continue
      if (exit_code in on_codes["values"]) == (on_codes["operator"] == "In"):
        return rule["action"]
    elif disrupted and any(p["type"] == "DisruptionTarget" and p["status"] == "True"
                           for p in rule["onPodConditions"]):
      return rule["action"]
  return None


def job_failure_reason(job_spec: dict, exit_code: int, disrupted: bool = False):
  """The reason the Job fails with after that pod, or None if it does not fail: FailJob gives
  PodFailurePolicy; a counted failure past backoffLimit gives BackoffLimitExceeded (k8s.io/api
  batch/v1 JobReason*; job_controller.go)."""
  action = pod_failure_action(job_spec, exit_code, disrupted)
  if action == "FailJob":
    return "PodFailurePolicy"
  if action in ("Count", None) and job_spec.get("backoffLimit", 6) == 0:
    return "BackoffLimitExceeded"
  return None


def jobset_action(jobset_spec: dict, reason: str, rjob: str) -> str:
  """The JobSet's action for a Job of `rjob` failed with `reason`: the first matching rule's,
  else RestartJobSet (jobset pkg/controllers/failure_policy.go, defaultFailurePolicyRuleAction);
  without a failurePolicy the JobSet fails."""
  policy = jobset_spec.get("failurePolicy")
  if policy is None:
    return "FailJobSet"
  for rule in policy.get("rules", []):
    if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
      continue
    if rule.get("targetReplicatedJobs") and rjob not in rule["targetReplicatedJobs"]:
      continue
    return rule["action"]
  return "RestartJobSet"


def trainer_v2_jobset(runtime: dict, trainjob: dict) -> dict:
  """The JobSet Kubeflow Trainer v2.3.0 makes of a TrainJob and its plainML runtime, as far as
  names, pod count, env, image, args and resources go: named after the TrainJob
  (pkg/runtime/framework/plugins/jobset/jobset.go Build); the trainer-ancestor job's pods =
  the TrainJob's numNodes (plainml/plainml.go EnforceMLPolicy; jobset.go SyncParallelCount);
  the TrainJob's env upserted into its "node" container (plainml.go) and its image and args
  set there (jobset/builder.go Trainer); resourcesPerNode (core/trainingruntime.go)."""
  spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
  trainer = trainjob["spec"].get("trainer", {})
  nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
  for rjob in spec["replicatedJobs"]:
    if rjob["template"]["metadata"]["labels"].get(
        "trainer.kubeflow.org/trainjob-ancestor-step") != "trainer":
      continue
    rjob["replicas"] = 1
    rjob["template"]["spec"]["parallelism"] = rjob["template"]["spec"]["completions"] = nodes
    for container in rjob["template"]["spec"]["template"]["spec"]["containers"]:
      if container["name"] != "node":
        continue
      env = {e["name"]: e for e in container.get("env", [])}
      env.update({e["name"]: e for e in trainer.get("env", [])})
      container["env"] = list(env.values())
      for field in ("image", "args"):
        if field in trainer:
          container[field] = trainer[field]
      if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
  return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
          "metadata": {"name": trainjob["metadata"]["name"],
                       "namespace": trainjob["metadata"].get("namespace", "")},
          "spec": spec}
