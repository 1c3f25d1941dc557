"""The CNN's shapes, parameter count and options."""

import keras
import numpy as np

from trainer import config as config_lib
from trainer import model as model_lib


def test_default_model_shapes():
  m = model_lib.build_model(config_lib.Config(epochs=1).model, (28, 28, 1), 10)
  out = m(np.zeros((3, 28, 28, 1), np.float32), training=False)
  assert out.shape == (3, 10) and out.dtype == "float32"
  # 2x2 fold (28x28x1 -> 14x14x4), conv0 3x3 same to 32, conv1 3x3 same to 48, pool 7x7x48.
  assert m.count_params() == (3 * 3 * 4 * 32 + 32) + (3 * 3 * 32 * 48 + 48) + (
      7 * 7 * 48 * 128 + 128) + (128 * 10 + 10)


def test_kernel_sizes_and_padding_set_the_shapes():
  c = config_lib.Config(epochs=1, model_widths=(8, 16), kernel_sizes=(3, 3), conv_padding="same",
                        pool_sizes=(2, 2), space_to_depth=1, dense_units=0)
  m = model_lib.build_model(c.model, (28, 28, 1), 10)
  assert m.get_layer("conv0").kernel.shape == (3, 3, 1, 8)
  assert m.get_layer("flatten").output.shape[-1] == 7 * 7 * 16  # same padding: 28 -> 14 -> 7
  valid = model_lib.build_model(c.replace(conv_padding="valid").model, (28, 28, 1), 10)
  assert valid.get_layer("flatten").output.shape[-1] == 5 * 5 * 16  # 26 -> 13 -> 11 -> 5


def test_bias_after_pooling_equals_a_convolution_bias_before_it():
  import tensorflow as tf
  c = config_lib.Config(epochs=1, model_widths=(8,), kernel_sizes=(3,), pool_sizes=(2,),
                        conv_padding="valid", space_to_depth=1, dense_units=0)
  m = model_lib.build_model(c.model, (10, 10, 1), 3)
  bias = tf.random.normal((8,), seed=2)
  m.get_layer("bias0").bias.assign(bias)
  x = tf.random.normal((4, 10, 10, 1), seed=3)
  kernel = m.get_layer("conv0").kernel
  conv = tf.nn.conv2d(x, kernel, 1, "VALID") + bias
  textbook = tf.nn.relu(tf.nn.max_pool2d(conv, 2, 2, "VALID"))
  block = keras.Model(m.input, m.get_layer("relu0").output)
  np.testing.assert_allclose(block(x), textbook, rtol=1e-6, atol=1e-6)


def test_space_to_depth_pool_sizes_and_global_pool_set_the_shapes():
  c = config_lib.Config(epochs=1, space_to_depth=2, model_widths=(8, 16), kernel_sizes=(3, 3),
                        pool_sizes=(1, 2), conv_padding="same", dense_units=0)
  m = model_lib.build_model(c.model, (28, 28, 1), 10)
  assert m.get_layer("conv0").kernel.shape == (3, 3, 4, 8), "2x2 pixels folded into 4 channels"
  assert "pool0" not in [layer.name for layer in m.layers], "pool size 1 means no pooling"
  assert m.get_layer("flatten").output.shape[-1] == 7 * 7 * 16  # 14 -> 14 -> pool 7
  pooled = model_lib.build_model(c.replace(global_pool=True).model, (28, 28, 1), 10)
  assert pooled.get_layer("global_pool").output.shape[-1] == 16
  assert pooled.count_params() == m.count_params() - (7 * 7 - 1) * 16 * 10
  assert pooled(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)


def test_space_to_depth_moves_pixel_blocks_into_channels():
  x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  folded = model_lib.SpaceToDepth(2)(x).numpy()
  assert folded.shape == (2, 2, 2, 4)
  np.testing.assert_array_equal(folded[0, 0, 0], [x[0, 0, 0, 0], x[0, 0, 1, 0], x[0, 1, 0, 0],
                                                  x[0, 1, 1, 0]])
  np.testing.assert_array_equal(folded[1, 1, 1], x[1, 2:, 2:, 0].reshape(-1))


def test_space_to_depth_must_divide_the_image():
  import pytest
  from trainer import errors
  c = config_lib.Config(epochs=1, space_to_depth=3)
  with pytest.raises(errors.ConfigError, match="--space_to_depth=3"):
    model_lib.build_model(c.model, (28, 28, 1), 10)


def test_options_change_the_architecture():
  c = config_lib.Config(epochs=1, model_widths=(8,), kernel_sizes=(3,), pool_sizes=(2,),
                        batch_norm=True, dense_units=0, dropout=0.0)
  m = model_lib.build_model(c.model, (32, 32, 3), 5)
  names = [layer.name for layer in m.layers]
  assert "hidden" not in names and "dropout" not in names and "bn0" in names
  assert m(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 5)


def test_too_many_valid_blocks_is_a_config_error():
  import pytest
  from trainer import errors
  c = config_lib.Config(epochs=1, model_widths=(8, 8, 8, 8), kernel_sizes=(5, 3, 3, 3),
                        pool_sizes=(2, 2, 2, 2), conv_padding="valid", space_to_depth=1)
  with pytest.raises(errors.ConfigError, match="--conv_padding=same"):
    model_lib.build_model(c.model, (28, 28, 1), 10)
  model_lib.build_model(c.replace(conv_padding="same").model, (28, 28, 1), 10)  # 28 -> 1 is fine
