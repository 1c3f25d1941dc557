"""The CNN's shapes, parameter count and options."""

import numpy as np

from trainer import config as config_lib
from trainer import model as model_lib


def test_default_model_shapes():
  m = model_lib.build_model(config_lib.Config(epochs=1), (28, 28, 1), 10)
  out = m(np.zeros((3, 28, 28, 1), np.float32), training=False)
  assert out.shape == (3, 10) and out.dtype == "float32"
  # conv0 3*3*1*32+32, conv1 3*3*32*64+64, hidden 7*7*64*128+128, logits 128*10+10
  assert m.count_params() == 320 + 18496 + 3136 * 128 + 128 + 1290


def test_options_change_the_architecture():
  c = config_lib.Config(epochs=1, model_widths=(8,), batch_norm=True, dense_units=0,
                        dropout=0.0)
  m = model_lib.build_model(c, (32, 32, 3), 5)
  names = [layer.name for layer in m.layers]
  assert "hidden" not in names and "dropout" not in names and "bn0" in names
  assert m(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 5)
