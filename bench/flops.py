"""Analytic FLOP counts: 2 FLOP per multiply-add in convolutions and dense layers only."""

# Backward costs about twice the forward pass (input and weight gradients).
TRAIN_TO_FORWARD = 3


def conv2d_flops(out_h: int, out_w: int, kernel_h: int, kernel_w: int, in_channels: int,
                 out_channels: int) -> int:
  """Forward FLOPs of one image through a 2-D convolution (bias, activation ignored)."""
  return 2 * out_h * out_w * kernel_h * kernel_w * in_channels * out_channels


def dense_flops(in_features: int, out_features: int) -> int:
  return 2 * in_features * out_features


def layer_flops(layer) -> int:
  """Forward FLOPs per image of one built Keras layer; layers other than Conv2D/Dense are 0."""
  kind = type(layer).__name__
  if kind == "Conv2D":
    _, out_h, out_w, out_c = layer.output.shape
    kernel_h, kernel_w, in_c, _ = layer.kernel.shape
    return conv2d_flops(out_h, out_w, kernel_h, kernel_w, in_c, out_c)
  if kind == "Dense":
    in_f, out_f = layer.kernel.shape
    return dense_flops(in_f, out_f)
  return 0


def model_flops(model) -> dict:
  """Per-layer forward FLOPs per image and the forward and training totals."""
  per_layer = {layer.name: layer_flops(layer) for layer in model.layers}
  per_layer = {name: f for name, f in per_layer.items() if f}
  forward = sum(per_layer.values())
  return {"per_layer_forward": per_layer, "forward": forward,
          "train": TRAIN_TO_FORWARD * forward}
