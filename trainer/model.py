"""The CNN: convolution blocks (conv, optional synchronized batch norm, ReLU, pool) and a linear classifier."""

import keras


def build_model(config, image_shape, num_classes: int) -> keras.Model:
  """Builds the model; call under strategy.scope() so variables are distributed."""
  inputs = keras.Input(shape=image_shape, name="images")
  x = inputs
  for i, width in enumerate(config.model_widths):
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not config.batch_norm,
                            name=f"conv{i}")(x)
    if config.batch_norm:
      # Synchronized so every replica and worker keeps identical moving statistics.
      x = keras.layers.BatchNormalization(synchronized=True, momentum=0.9, name=f"bn{i}")(x)
    x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  if config.dense_units:
    x = keras.layers.Dense(config.dense_units, activation="relu", name="hidden")(x)
  if config.dropout:
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
  # Logits stay float32 under mixed precision for a stable softmax and loss.
  outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
  return keras.Model(inputs, outputs, name="cnn")
