"""Exports the trained model as a SavedModel with a uint8-images serving signature."""

import json
import logging
import os
import shutil
import tempfile

import tensorflow as tf

# Next to saved_model.pb: a JSON list, label i's name at index i.
CLASS_NAMES = "class_names.json"
# The one signature: images uint8 [None, H, W, C] -> probabilities float32 [None, classes],
# classes int64 [None]. TensorFlow Serving and Vertex AI's prebuilt containers serve it by name.
SIGNATURE = "serving_default"


def export_saved_model(eval_model, weights, image_shape, export_dir: str,
                       class_names=()) -> str:
  """Exports `weights` in eval_model's float32 copy, atomically: a crash never leaves a partial
  export under export_dir's name. class_names (label i's name), when given, go into
  export_dir/CLASS_NAMES for trainer.predict.

  The export answers alike in TensorFlow 2 (tf.saved_model.load, keras.layers.TFSMLayer), in the
  TF1 session loader that TensorFlow Serving and `saved_model_cli run` use (variables restored
  through the graph's saver), and after tf.lite.TFLiteConverter.from_saved_model: see _Serving.
  """
  eval_model.load(weights)
  parent = os.path.dirname(os.path.abspath(export_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  # mkdtemp makes it 0700: a model server running as another user could not read export/.
  os.chmod(staging, 0o755)
  try:
    module = _Serving(eval_model.model, image_shape)
    tf.saved_model.save(module, staging, signatures={SIGNATURE: module.serve})
    if class_names:
      with open(os.path.join(staging, CLASS_NAMES), "w") as f:
        json.dump(list(class_names), f, indent=1)
    old = None
    if os.path.exists(export_dir):
      old = export_dir + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.rename(export_dir, old)
    os.rename(staging, export_dir)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("Exported SavedModel to %s", export_dir)
  return export_dir


class _Serving(tf.Module):
  """The SavedModel's root: the serving function and exactly the tf.Variables its graph reads.

  It must not hold the Keras model. A Keras 3 variable wraps a tf.Variable, and when saved it
  writes its value into a second, new tf.Variable (Variable._export_to_saved_model_graph in
  keras/src/backend/tensorflow/core.py): the graph's saver saves and restores that copy while
  the function reads the wrapped one. TensorFlow 2's loader binds the function's captures
  through the object graph and never notices. The session loaders (LoadSavedModel in
  tensorflow/cc/saved_model/loader.cc, which TensorFlow Serving uses, and Python's
  tf.compat.v1.saved_model.loader, which `saved_model_cli run` uses) only run the saver's
  restore op, so the signature fails: "Could not find variable logits/kernel". TFLite's
  converter imports such a (schema 1) SavedModel through a session the same way
  (SavedModelSignatureDefsToMlirImport, tensorflow/compiler/mlir/lite/
  tf_to_tfl_flatbuffer.cc) and gives a variable a value only when the session holds one
  (initialize_variables_in_session_init.cc in tensorflow/compiler/mlir/tensorflow/transforms
  skips the rest): every weight stayed a TFLite VAR_HANDLE / READ_VARIABLE that nothing
  assigns, a 7.5 KB model whose answers did not depend on the image (NaN probabilities here).
  Tracking the function's own variables (ConcreteFunction.variables) instead gives each weight
  one node, which the object graph and the saver both use, and saves each weight once.
  """

  def __init__(self, model, image_shape):
    super().__init__()

    def serve(images):
      logits = model(tf.cast(images, tf.float32) / 255.0, training=False)
      probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
      return {"probabilities": probabilities,
              "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

    self.serve = tf.function(serve, autograph=False, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.uint8, name="images")])
    # Also an attribute of what tf.saved_model.load returns: the weights, each once.
    self.model_variables = list(self.serve.get_concrete_function().variables)
