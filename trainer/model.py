"""The CNN: convolution blocks (conv, optional synchronized batch norm, ReLU, pool) and a linear classifier."""

import keras

from trainer import errors


def build_model(config, image_shape, num_classes: int) -> keras.Model:
  """Builds the model; call under strategy.scope() so variables are distributed."""
  _check_spatial_size(config, image_shape)
  inputs = keras.Input(shape=image_shape, name="images")
  x = inputs
  for i, (width, kernel) in enumerate(zip(config.model_widths, config.kernel_sizes)):
    x = keras.layers.Conv2D(width, kernel, padding=config.conv_padding,
                            use_bias=not config.batch_norm, name=f"conv{i}")(x)
    if config.batch_norm:
      # Synchronized so every replica and worker keeps identical moving statistics.
      x = keras.layers.BatchNormalization(synchronized=True, momentum=0.9, name=f"bn{i}")(x)
    # Pooling before ReLU gives the same values (max commutes with ReLU) on 4x fewer elements.
    x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.ReLU(name=f"relu{i}")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  if config.dense_units:
    x = keras.layers.Dense(config.dense_units, activation="relu", name="hidden")(x)
  if config.dropout:
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
  # Logits stay float32 under mixed precision for a stable softmax and loss.
  outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
  return keras.Model(inputs, outputs, name="cnn")


def _check_spatial_size(config, image_shape) -> None:
  """Too many or too large valid convolutions shrink the image to nothing: say which flags."""
  size = min(image_shape[:2])
  for kernel in config.kernel_sizes:
    if config.conv_padding == "valid":
      size -= kernel - 1
    size //= 2  # max-pool
    if size < 1:
      raise errors.ConfigError(
          f"--model_widths/--kernel_sizes/--conv_padding shrink the {image_shape[0]}x"
          f"{image_shape[1]} images below 1x1 after {len(config.kernel_sizes)} blocks: use fewer "
          "blocks, smaller kernels or --conv_padding=same.")
