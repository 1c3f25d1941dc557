"""The CPU's FP32 peak from /proc/cpuinfo: cores x clock x FLOP/cycle, assumption stated."""

import dataclasses
import os
from typing import Optional


@dataclasses.dataclass(frozen=True)
class CpuInfo:
  """What /proc/cpuinfo tells us about the processor (under KVM the clock is the nominal one)."""

  model_name: str
  vendor: str
  family: int
  model: int
  cores: int
  mhz: float
  flags: frozenset


@dataclasses.dataclass(frozen=True)
class Peak:
  """FP32 peak and exactly how it was derived."""

  gflops: float
  cores: int
  clock_ghz: float
  flops_per_cycle: int
  assumption: str


def parse_cpuinfo(text: str, cores: Optional[int] = None) -> CpuInfo:
  """Reads the first processor block; cores defaults to the number of processor blocks."""
  blocks = [b for b in text.strip().split("\n\n") if b.strip()]
  fields = {}
  for line in blocks[0].splitlines():
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  return CpuInfo(model_name=fields.get("model name", "unknown"),
                 vendor=fields.get("vendor_id", "unknown"),
                 family=int(fields.get("cpu family", "0")),
                 model=int(fields.get("model", "0")),
                 cores=cores or len(blocks),
                 mhz=float(fields.get("cpu MHz", "0") or 0),
                 flags=frozenset(fields.get("flags", "").split()))


def read_cpuinfo(path: str = "/proc/cpuinfo") -> CpuInfo:
  with open(path) as f:
    text = f.read()
  # The cores this process may run on, which is what the trainer gets.
  return parse_cpuinfo(text, cores=len(os.sched_getaffinity(0)))


def fp32_flops_per_cycle(cpu: CpuInfo) -> tuple:
  """(FP32 FLOP per cycle per core, why) from the vendor, family and SIMD flags."""
  if cpu.vendor == "AuthenticAMD" and cpu.family == 25:
    # Zen 3/Zen 4 have two 256-bit FMA pipes; Zen 4 runs AVX-512 as two 256-bit halves, so
    # AVX-512 does not raise the FMA rate: 2 pipes x 8 lanes x 2 FLOP.
    why = "AMD family 25 ({}): 2 FMA pipes x 256 bit (8 FP32 lanes) x 2 FLOP/FMA"
    if "avx512f" in cpu.flags:
      return 32, why.format("Zen 4") + "; AVX-512 is double-pumped, so 32 (not 64) FLOP/cycle"
    return 32, why.format("Zen 3")
  if cpu.vendor == "AuthenticAMD" and cpu.family >= 26:
    return 64, "AMD Zen 5: 2 FMA pipes x 512 bit (16 FP32 lanes) x 2 FLOP/FMA"
  if "avx512f" in cpu.flags:
    return 64, "AVX-512 with 2 FMA units x 16 FP32 lanes x 2 FLOP/FMA (Xeon Gold/Platinum class)"
  if "fma" in cpu.flags and "avx2" in cpu.flags:
    return 32, "AVX2 with 2 FMA units x 8 FP32 lanes x 2 FLOP/FMA"
  return 8, "SSE without FMA: 4 FP32 lanes x (1 add + 1 mul) per cycle"


def fp32_peak(cpu: CpuInfo, clock_ghz: float = 0.0, flops_per_cycle: int = 0) -> Peak:
  """Peak = cores x clock x FLOP/cycle; explicit arguments override what was detected."""
  detected, why = fp32_flops_per_cycle(cpu)
  per_cycle = flops_per_cycle or detected
  if flops_per_cycle:
    why = f"{flops_per_cycle} FLOP/cycle given on the command line (detected: {why})"
  clock = clock_ghz or cpu.mhz / 1000.0
  clock_note = ("clock given on the command line" if clock_ghz else
                "clock = 'cpu MHz' of /proc/cpuinfo (nominal under a hypervisor; boost unseen)")
  return Peak(gflops=cpu.cores * clock * per_cycle, cores=cpu.cores, clock_ghz=clock,
              flops_per_cycle=per_cycle, assumption=f"{why}; {clock_note}")
