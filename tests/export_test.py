"""The export answers alike wherever a SavedModel is loaded: TensorFlow 2 (tf.saved_model.load,
keras.layers.TFSMLayer), the TF1 session loader of TensorFlow Serving and `saved_model_cli run`
(variables restored through the graph's saver), and TFLite after conversion."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conftest import child_env

# The first test digits every loader classifies.
KNOWN_DIGITS = 100


@pytest.fixture(scope="module")
def untrained(synthetic_tfds_dir, tmp_path_factory):
  """An export of the default CNN's seeded initial weights, made as the trainer makes it: the
  float32 evaluation copy built while the trainer's mixed_bfloat16 policy is global. The digits
  are the synthetic MNIST's (conftest.py): no test here needs real ones, and real MNIST's
  preparation costs 4-5 s of CPU in each process that needs it."""
  import keras
  from trainer import config as config_lib
  from trainer import data
  from trainer import export
  from trainer import step
  root = tmp_path_factory.mktemp("untrained")
  config = config_lib.Config(model_dir=str(root / "run"), data_dir=synthetic_tfds_dir,
                             train_steps=1)
  splits = data.load(config.data, with_train=False)
  keras.utils.set_random_seed(0)
  policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    eval_model = step.EvalModel(config.model, splits)
    export_dir = export.export_saved_model(
        eval_model, eval_model.model.get_weights(), splits.image_shape,
        str(root / "run" / "export"), splits.class_names)
  finally:
    keras.mixed_precision.set_global_policy(policy)
  images = splits.test_images[:KNOWN_DIGITS]
  logits = eval_model.model(images.astype(np.float32) / 255.0, training=False)
  expected = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
  return export_dir, eval_model.model.count_params(), images, expected


def test_session_loader_restores_the_weights(untrained):
  """The loader `saved_model_cli run` and TensorFlow Serving use (tf.compat.v1 loader: a graph,
  a session, the saver's restore op) answers what the Keras model answers."""
  import tensorflow as tf
  export_dir, num_params, images, expected = untrained
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)
    signature = meta.signature_def["serving_default"]
    assert list(signature.inputs) == ["images"]
    assert signature.inputs["images"].dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == [-1, 28, 28, 1]
    assert sorted(signature.outputs) == ["classes", "probabilities"]
    assert signature.outputs["probabilities"].dtype == tf.float32.as_datatype_enum
    assert signature.outputs["classes"].dtype == tf.int64.as_datatype_enum
    out = session.run({k: v.name for k, v in signature.outputs.items()},
                      {signature.inputs["images"].name: images})
  np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(out["classes"], expected.argmax(axis=1))
  assert len(set(out["classes"])) > 1, "answers that depend on the image"
  # Each weight is saved once, in float32 (the evaluation copy, not the bfloat16 policy).
  reader = tf.train.load_checkpoint(os.path.join(export_dir, "variables", "variables"))
  shapes = {k: v for k, v in reader.get_variable_to_shape_map().items()
            if k.endswith("VARIABLE_VALUE")}
  assert sum(int(np.prod(s)) for s in shapes.values()) == num_params
  assert {reader.get_variable_to_dtype_map()[k] for k in shapes} == {tf.float32}
  with open(os.path.join(export_dir, "class_names.json")) as f:
    assert json.load(f) == [str(i) for i in range(10)]
  # A model server running as another user can read it (mkdtemp alone would leave 0700).
  assert os.stat(export_dir).st_mode & 0o777 == 0o755


def test_tf2_loader_and_tfsmlayer_answer_the_same(untrained):
  import keras
  import tensorflow as tf
  export_dir, _, images, expected = untrained
  serve = tf.saved_model.load(export_dir).signatures["serving_default"]
  out = serve(images=tf.constant(images))
  np.testing.assert_allclose(out["probabilities"].numpy(), expected, rtol=1e-4, atol=1e-6)
  layer = keras.layers.TFSMLayer(export_dir, call_endpoint="serving_default")
  out = layer(images)
  np.testing.assert_allclose(keras.ops.convert_to_numpy(out["probabilities"]), expected,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(keras.ops.convert_to_numpy(out["classes"]), expected.argmax(1))


def test_tflite_conversion_keeps_the_weights(untrained):
  """The converter imports the SavedModel through a session as the session loader does; a
  variable the saver does not restore stays an unassigned TFLite variable (7.5 KB, no weights)."""
  export_dir, num_params, images, expected = untrained
  flatbuffer = _tflite(export_dir)
  assert len(flatbuffer) >= 4 * num_params, f"{len(flatbuffer)} bytes for {num_params} floats"
  out = _run_tflite(flatbuffer, images)
  np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out["classes"], expected.argmax(axis=1))


@pytest.mark.slow
def test_trained_export_classifies_digits_in_every_loader(tiny, tmp_path):
  """A trained default CNN (under this CPU's --precision=auto) classifies known test digits, and
  `saved_model_cli run` (a process of its own, the session loader), TFLite and TFSMLayer give
  exactly the classes TensorFlow 2 gives."""
  import keras
  import tensorflow as tf
  from trainer import data
  from trainer import train
  config = tiny(train_steps=150, global_batch_size=64, train_examples=9600, model_widths=(32, 48),
                steps_per_loop=25, log_every_steps=50, checkpoint_every_steps=150)
  train.train_and_evaluate(config)
  export_dir = os.path.join(config.outputs.model_dir, "export")
  splits = data.load(config.data, with_train=False)
  images = splits.test_images[:KNOWN_DIGITS]
  labels = splits.test_labels[:KNOWN_DIGITS]

  serve = tf.saved_model.load(export_dir).signatures["serving_default"]
  tf2 = serve(images=tf.constant(images))
  classes = tf2["classes"].numpy()
  assert (classes == labels).mean() >= 0.9, (classes, labels)

  np.save(tmp_path / "x.npy", images)
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  result = subprocess.run(
      [cli, "run", "--dir", export_dir, "--tag_set", "serve", "--signature_def",
       "serving_default", "--inputs", f"images={tmp_path / 'x.npy'}",
       "--outdir", str(tmp_path / "cli")],
      env=child_env(), capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / "cli" / "classes.npy"), classes)
  np.testing.assert_allclose(np.load(tmp_path / "cli" / "probabilities.npy"),
                             tf2["probabilities"].numpy(), rtol=1e-4, atol=1e-6)

  flatbuffer = _tflite(export_dir)
  num_params = sum(int(np.prod(v.shape)) for v in tf.saved_model.load(export_dir).model_variables)
  assert num_params > 300_000 and len(flatbuffer) >= 4 * num_params
  np.testing.assert_array_equal(_run_tflite(flatbuffer, images)["classes"], classes)

  out = keras.layers.TFSMLayer(export_dir, call_endpoint="serving_default")(images)
  np.testing.assert_array_equal(keras.ops.convert_to_numpy(out["classes"]), classes)


def _tflite(export_dir: str) -> bytes:
  import tensorflow as tf
  return tf.lite.TFLiteConverter.from_saved_model(export_dir).convert()


def _run_tflite(flatbuffer: bytes, images) -> dict:
  """TensorFlow 2.21's tf.lite.Interpreter (the LiteRT runtime, deprecated there in favour of
  the ai-edge-litert package, which this project does not install)."""
  import tensorflow as tf
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
  return interpreter.get_signature_runner("serving_default")(images=images)
