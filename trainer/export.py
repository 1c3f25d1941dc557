"""Exports the trained model as a SavedModel with a uint8-images serving signature."""

import json
import logging
import os
import shutil
import tempfile

import tensorflow as tf

# Next to saved_model.pb: a JSON list, label i's name at index i.
CLASS_NAMES = "class_names.json"


class _Serving(tf.Module):
  """Holds the model so its variables are saved; the signature does the preprocessing."""

  def __init__(self, model, image_shape):
    super().__init__()
    self.model = model
    self.serve = tf.function(self._serve, autograph=False, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.uint8, name="images")])

  def _serve(self, images):
    logits = self.model(tf.cast(images, tf.float32) / 255.0, training=False)
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    return {"probabilities": probabilities,
            "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}


def export_saved_model(eval_model, weights, image_shape, export_dir: str,
                       class_names=()) -> str:
  """Exports `weights` in eval_model's float32 copy, atomically: a crash never leaves a partial
  export under export_dir's name. class_names (label i's name), when given, go into
  export_dir/CLASS_NAMES for trainer.predict."""
  eval_model.load(weights)
  model = eval_model.model
  parent = os.path.dirname(os.path.abspath(export_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    module = _Serving(model, image_shape)
    tf.saved_model.save(module, staging, signatures={"serving_default": module.serve})
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
