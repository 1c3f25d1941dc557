"""A Kubeflow Trainer v2 ClusterTrainingRuntime and TrainJob (trainer.kubeflow.org/v1alpha1).

Trainer v2 has no TensorFlow runtime: its maintainers deprioritized distributed TensorFlow and
point to "the plainML plugin" with TF_CONFIG set by the user (kubeflow/trainer#2699, closed;
#1529). plainML is an mlPolicy with numNodes and no framework policy (no torch, mpi, jax, ...):
the PlainML plugin then only sets the trainer Job's pod count from the TrainJob's numNodes and
adds the TrainJob's env to the container named "node" of the replicated job labelled
trainer.kubeflow.org/trainjob-ancestor-step: trainer (kubeflow/trainer v2.3.0
pkg/runtime/framework/plugins/plainml/plainml.go; pkg/constants/constants.go AncestorTrainer,
Node; pkg/runtime/core/trainingruntime.go takes the pod count from mlPolicy.numNodes). Trainer
creates a JobSet with the TrainJob's name from the runtime's template
(pkg/runtime/framework/plugins/jobset/jobset.go Build; builder.go gives the TrainJob's image and
args to the "node" container), so the pods are the same JobSet pods as --api=jobset's and build
TF_CONFIG themselves the same way (trainer/runtime/indexed_pod.py): nobody writes TF_CONFIG.

The runtime is cluster-scoped and shared: it holds what every TensorFlow job of this image has
in common (the pod, the exit-code contract, DNS); the TrainJob holds this job's image,
arguments, node count and resources. TRAINER_WORKERS goes in the TrainJob's env beside numNodes,
so a TrainJob that changes one changes both.
"""

from deploy.k8s import common
from deploy.k8s import jobsets
from deploy.k8s.common import Options
from trainer.runtime import indexed_pod

API_GROUP = "trainer.kubeflow.org"
API_VERSION = f"{API_GROUP}/v1alpha1"
# pkg/constants/constants.go: LabelTrainJobAncestor, AncestorTrainer, Node.
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
ANCESTOR_TRAINER = "trainer"
NODE = "node"
# The label Trainer's own runtimes carry (manifests/base/runtimes/*.yaml), by which its SDK
# lists runtimes per framework.
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"


def train_job(o: Options) -> dict:
  """The TrainJob: this job's image, arguments, node count, resources, and TRAINER_WORKERS."""
  trainer = {"image": o.image, "args": common.trainer_arguments(o), "numNodes": o.workers,
             "env": [{"name": indexed_pod.WORKERS, "value": str(o.workers)}],
             "resourcesPerNode": common.resources(o)}
  return {"apiVersion": API_VERSION, "kind": "TrainJob",
          "metadata": common.metadata(o, o.name),
          "spec": {"runtimeRef": {"name": o.runtime_name, "apiGroup": API_GROUP,
                                  "kind": "ClusterTrainingRuntime"},
                   "trainer": trainer}}


def cluster_training_runtime(o: Options) -> dict:
  """The ClusterTrainingRuntime: a plainML policy and a JobSet template with one "node" job."""
  # The instance label would name one job; the runtime serves every TrainJob that names it.
  pod_labels = {common.APP_LABEL: common.APP_NAME}
  node = jobsets.replicated_job(
      o, NODE, o.workers, NODE, worker_job=NODE,
      job_labels={ANCESTOR_LABEL: ANCESTOR_TRAINER}, pod_labels=pod_labels, with_args=False)
  return {"apiVersion": API_VERSION, "kind": "ClusterTrainingRuntime",
          "metadata": {"name": o.runtime_name,
                       "labels": {FRAMEWORK_LABEL: "tensorflow", **pod_labels}},
          "spec": {"mlPolicy": {"numNodes": o.workers},
                   "template": {"spec": jobsets.spec(o, [node])}}}
