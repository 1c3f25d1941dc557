"""Analytic FLOPs (2 per multiply-add, conv and dense layers only) and the CPU's nominal FP32
peak (cores x clock x FLOP/cycle, from /proc/cpuinfo, with the assumption spelled out)."""

import os

TRAIN_TO_FORWARD = 3  # backward costs about twice the forward pass (input and weight gradients)


def conv2d_flops(out_h, out_w, kernel_h, kernel_w, in_channels, out_channels) -> int:
  return 2 * out_h * out_w * kernel_h * kernel_w * in_channels * out_channels


def dense_flops(in_features, out_features) -> int:
  return 2 * in_features * out_features


def layer_flops(layer) -> int:
  """Forward FLOPs per image of one built Keras layer; layers other than Conv2D/Dense are 0."""
  kind = type(layer).__name__
  if kind == "Conv2D":
    _, out_h, out_w, out_c = layer.output.shape
    kernel_h, kernel_w, in_c, _ = layer.kernel.shape
    return conv2d_flops(out_h, out_w, kernel_h, kernel_w, in_c, out_c)
  if kind == "Dense":
    return dense_flops(*layer.kernel.shape)
  return 0


def model_flops(model) -> dict:
  """Per-layer forward FLOPs per image and the forward and training totals."""
  per_layer = {layer.name: layer_flops(layer) for layer in model.layers}
  per_layer = {name: f for name, f in per_layer.items() if f}
  forward = sum(per_layer.values())
  return {"per_layer_forward": per_layer, "forward": forward, "train": TRAIN_TO_FORWARD * forward}


def parse_cpuinfo(text: str, cores: int = 0) -> dict:
  """The first processor block's fields; cores defaults to the number of processor blocks."""
  blocks = [b for b in text.strip().split("\n\n") if b.strip()]
  fields = {}
  for line in blocks[0].splitlines():
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  return {"model_name": fields.get("model name", "unknown"),
          "vendor": fields.get("vendor_id", "unknown"),
          "family": int(fields.get("cpu family", "0") or 0),
          "cores": cores or len(blocks), "mhz": float(fields.get("cpu MHz", "0") or 0),
          "flags": set(fields.get("flags", "").split())}


def flops_per_cycle(cpu: dict) -> tuple:
  """(FP32 FLOP per cycle per core, why) from the vendor, family and SIMD flags."""
  if cpu["vendor"] == "AuthenticAMD" and cpu["family"] == 25:
    if "avx512f" in cpu["flags"]:
      return 32, ("AMD family 25 (Zen 4): 2 FMA pipes x 256 bit x 2 FLOP/FMA; AVX-512 is "
                  "double-pumped, so 32 (not 64) FLOP/cycle")
    return 32, "AMD family 25 (Zen 3): 2 FMA pipes x 256 bit (8 FP32 lanes) x 2 FLOP/FMA"
  if cpu["vendor"] == "AuthenticAMD" and cpu["family"] >= 26:
    return 64, "AMD Zen 5: 2 FMA pipes x 512 bit (16 FP32 lanes) x 2 FLOP/FMA"
  if "avx512f" in cpu["flags"]:
    return 64, "AVX-512 with 2 FMA units x 16 FP32 lanes x 2 FLOP/FMA"
  if "fma" in cpu["flags"] and "avx2" in cpu["flags"]:
    return 32, "AVX2 with 2 FMA units x 8 FP32 lanes x 2 FLOP/FMA"
  return 8, "SSE without FMA: 4 FP32 lanes x (1 add + 1 mul) per cycle"


def nominal_peak(cpu: dict) -> dict:
  """{gflops, assumption}: cores x 'cpu MHz' x FLOP/cycle (nominal under a hypervisor)."""
  per_cycle, why = flops_per_cycle(cpu)
  ghz = cpu["mhz"] / 1000
  return {"gflops": cpu["cores"] * ghz * per_cycle, "model_name": cpu["model_name"],
          "assumption": f"{cpu['cores']} cores x {ghz:.3f} GHz ('cpu MHz' of /proc/cpuinfo; "
                        f"boost unseen) x {per_cycle} FLOP/cycle: {why}"}


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict:
  with open(path) as f:
    return parse_cpuinfo(f.read(), cores=len(os.sched_getaffinity(0)))
