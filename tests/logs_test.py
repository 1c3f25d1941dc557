"""The native start-up notices TensorFlow writes before absl::InitializeLog are held back."""

from trainer import logs

# Lines as TensorFlow 2.21 wrote them on this CPU-only machine.
CAPTURED = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796656140.503353    4308 port.cc:153] oneDNN custom operations are on.\n"
    "I0000 00:00:1796656140.503823    4308 cudart_stub.cc:31] Could not find cuda drivers\n"
    "E0000 00:00:1796656141.907552    4308 cuda_platform.cc:52] failed call to cuInit: INTERNAL:"
    " CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
    "E0000 00:00:1796656141.907552    4308 some_kernel.cc:9] a real error\n"
    "Traceback (most recent call last):\n")


def test_notices_go_and_errors_stay():
  kept = logs.native_lines_to_keep(CAPTURED, no_driver=True)
  assert kept == ["E0000 00:00:1796656141.907552    4308 some_kernel.cc:9] a real error\n",
                  "Traceback (most recent call last):\n"]


def test_a_failed_cuinit_stays_where_a_driver_exists():
  kept = logs.native_lines_to_keep(CAPTURED, no_driver=False)
  assert any("cuInit" in line for line in kept) and len(kept) == 3


def test_our_own_lines_are_never_held_back():
  ours = "I1207 15:09:02.878987 139833378753408 gpu.py:113] TensorFlow 2.21.0 sees 0 GPU(s).\n"
  assert logs.native_lines_to_keep(ours, no_driver=True) == [ours]
