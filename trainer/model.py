"""The CNN: convolution blocks (conv, batch norm or bias, pool, ReLU) and a dense classifier."""

import keras
import tensorflow as tf

from trainer import errors
from trainer.config import ModelConfig


def build_model(config: ModelConfig, image_shape, num_classes: int) -> keras.Model:
  """Builds the model; call under strategy.scope() so variables are distributed."""
  _check_spatial_size(config, image_shape)
  inputs = keras.Input(shape=image_shape, name="images")
  x = inputs
  if config.space_to_depth > 1:
    # A free reshape: 28x28x1 becomes 7x7x16 at 4, so every convolution gets deep inputs, which
    # CPU kernels run several times closer to peak than a 1-channel convolution.
    x = SpaceToDepth(config.space_to_depth, name="space_to_depth")(x)
  blocks = zip(config.model_widths, config.kernel_sizes, config.pool_sizes)
  for i, (width, kernel, pool) in enumerate(blocks):
    x = keras.layers.Conv2D(width, kernel, padding=config.conv_padding, use_bias=False,
                            name=f"conv{i}")(x)
    if config.batch_norm:
      # Synchronized so every replica and worker keeps identical moving statistics.
      x = keras.layers.BatchNormalization(synchronized=True, momentum=0.9, name=f"bn{i}")(x)
    # Max-pooling commutes with a per-channel bias and with ReLU, so pooling first gives the
    # same values on pool^2 fewer elements; the bias's gradient then also stays out of the
    # convolution's filter gradient, whose fused with-bias CPU kernel is slower.
    if pool > 1:
      x = keras.layers.MaxPooling2D(pool, name=f"pool{i}")(x)
    if not config.batch_norm:
      x = ChannelBias(name=f"bias{i}")(x)
    x = keras.layers.ReLU(name=f"relu{i}")(x)
  if config.global_pool:
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
  else:
    x = keras.layers.Flatten(name="flatten")(x)
  if config.dense_units:
    x = keras.layers.Dense(config.dense_units, activation="relu", name="hidden")(x)
  if config.dropout:
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
  # Logits stay float32 under mixed precision for a stable softmax and loss.
  outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
  return keras.Model(inputs, outputs, name="cnn")


class ChannelBias(keras.layers.Layer):
  """Adds a learned per-channel bias (a convolution's bias, applied after pooling)."""

  def build(self, input_shape):
    self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

  def call(self, inputs):
    return inputs + self.bias


class SpaceToDepth(keras.layers.Layer):
  """Moves each block x block patch of pixels into the channel axis (tf.nn.space_to_depth)."""

  def __init__(self, block_size: int, **kwargs):
    super().__init__(**kwargs)
    self.block_size = block_size

  def call(self, inputs):
    return tf.nn.space_to_depth(inputs, self.block_size)

  def compute_output_shape(self, input_shape):
    batch, h, w, c = input_shape
    b = self.block_size
    return (batch, h // b, w // b, c * b * b)

  def get_config(self):
    return {**super().get_config(), "block_size": self.block_size}


def _check_spatial_size(config: ModelConfig, image_shape) -> None:
  """Folding, valid convolutions and pooling must leave at least 1x1: say which flags."""
  height, width = image_shape[:2]
  if height % config.space_to_depth or width % config.space_to_depth:
    raise errors.ConfigError(
        f"--space_to_depth={config.space_to_depth} does not divide the {height}x{width} images: "
        "use a divisor of both sides (1 turns it off).")
  size = min(height, width) // config.space_to_depth
  for kernel, pool in zip(config.kernel_sizes, config.pool_sizes):
    if config.conv_padding == "valid":
      size -= kernel - 1
    size //= pool
    if size < 1:
      raise errors.ConfigError(
          f"--space_to_depth/--model_widths/--kernel_sizes/--pool_sizes/--conv_padding shrink "
          f"the {height}x{width} images below 1x1 after {len(config.kernel_sizes)} blocks: use "
          "fewer blocks, smaller kernels or pools, or --conv_padding=same.")
