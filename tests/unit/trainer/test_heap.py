"""The training process's heap policy: memory a step frees is kept for the next step instead of being
returned to the kernel and faulted in (and zeroed) again. Each case runs in a fresh interpreter, since the
policy is process-wide and this one may have set it already."""

from __future__ import annotations

import subprocess
import sys

# A step's buffers, allocated in one order and freed in another, as a forward pass and its backward do.
_STEPS = """
import resource, sys
import numpy as np
if sys.argv[1] == "kept":
    from fieldkube.trainer.heap import keep_freed_memory
    assert keep_freed_memory()

def step():
    held = [np.ones(n, dtype=np.uint8) for n in (6 << 20, 3 << 20, 5 << 20, 1 << 20, 4 << 20, 2 << 20)]
    grads = [np.ones(n, dtype=np.uint8) for n in (2 << 20, 700_000, 300_000)]
    for buffer in reversed(held):
        del buffer
    held.clear()
    grads.clear()

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _page_faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    return float(done.stdout)


def test_steps_fault_their_memory_in_again_by_default_and_not_once_it_is_kept() -> None:
    default = _page_faults_per_step("default")
    kept = _page_faults_per_step("kept")
    assert default > 1000, f"the default heap faulted {default} pages per step: the case shows nothing"
    assert kept < default / 20, f"{kept} page faults per step with the policy, {default} without"
