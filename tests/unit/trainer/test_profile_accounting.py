"""Accounting that closes: for the three built-in models and seed 001's VGG-11, the rows of a profiled
iteration (layers, functions between layers, loss, named phases, the profiler's bookkeeping and the gaps)
sum to the measured iteration, and the rows bracketed by a timer explain nearly all of it."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

from fieldkube.trainer.backends import SingleBackend
from fieldkube.trainer.errors import ConfigError
from fieldkube.trainer.launch_env import LaunchEnv
from fieldkube.trainer.profile import IterationRunner, ProfileSettings
from fieldkube.trainer.profile_hooks import CudaClock, LayerProfiler, WallClock, clock_for
from fieldkube.trainer.profile_report import ACCOUNT_ROWS

# Sizes where an iteration is 40-120 ms of CPU: below that, the per-module Python overhead of any
# framework weighs more (`make bench-profile` records the figures at 96 px / batch 4, wall clock).
MODELS: list[tuple[str, dict[str, Any], int, set[str]]] = [
    ("counter-mcnn", {}, 80, {"between:cat"}),
    ("counter-fcrn", {"base_channels": 16}, 96, {"between:interpolate", "between:max_pool2d"}),
    (
        "segmenter-unet",
        {"base_channels": 32, "depth": 3},
        64,
        {"between:pad", "between:cat", "between:interpolate"},
    ),
    ("vgg11", {"width": 0.25, "hidden": 128}, 96, {"between:flatten"}),
]


def _runner(
    model: str, params: dict[str, Any], profiling: bool = True, tile: int = 48, clock: str = "wall"
) -> IterationRunner:
    torch.set_num_threads(1)
    backend = SingleBackend(LaunchEnv("single", 0, 0, 1))
    settings = ProfileSettings(
        model=model, params=params, tile=tile, batch=2, profiling=profiling, lr=1e-2, clock=clock
    )
    return IterationRunner(settings, backend, torch.device("cpu"))


@pytest.mark.parametrize(("model", "params", "tile", "functions"), MODELS, ids=[m[0] for m in MODELS])
def test_rows_sum_to_the_iteration_and_explain_it(
    model: str, params: dict[str, Any], tile: int, functions: set[str]
) -> None:
    # The training thread's CPU time: what other processes on a shared machine take is in no row, so the
    # shares are those of the program (wall-clock figures: bench/README.md, bench-profile).
    runner = _runner(model, params, tile=tile, clock="thread")
    records = runner.run(9, 2)  # the median of 9: one iteration disturbed by a busy machine moves it little
    runner.close()
    shares = []
    for record in records:
        rows = runner.accounting(record)
        # structural: the rows tile the iteration, and no row is negative beyond clock rounding
        assert sum(rows[key] for key in ACCOUNT_ROWS) == pytest.approx(record.iteration_s, rel=1e-9)
        assert min(rows[key] for key in ACCOUNT_ROWS) > -1e-6, {k: rows[k] for k in ACCOUNT_ROWS}
        shares.append(rows["accounted"])
        layers = record.layers or {}
        for name in functions:  # the functional ops between modules are rows, forward and backward
            assert layers[name][0] > 0 and layers[name][1] > 0, (name, layers[name])
    # The rows a timer brackets (all but the gaps) explain the iteration within 5 %: in the least disturbed of
    # the nine iterations (another process's cache and memory traffic slows the untimed code between timers
    # too, so a busy machine widens the gaps; bench-profile records the medians), and the median within 10 %.
    assert max(shares) >= 0.95 and statistics.median(shares) >= 0.90, shares


def test_vgg11_is_seed_001s_network_and_trains_like_the_plain_run() -> None:
    runs = []
    for profiling in (False, True):
        runner = _runner("vgg11", {"width": 0.125, "hidden": 32}, profiling=profiling, tile=32)
        runner.run(2, 0)
        runner.close()
        runs.append(runner.model.state_dict())
    convs = [k for k in runs[0] if k.startswith("features") and k.endswith("weight")]
    linears = [k for k in runs[0] if k.startswith("classifier") and k.endswith("weight")]
    assert len(convs) == 8 and len(linears) == 3  # VGG-11 = 8 conv + 3 fully connected layers
    assert runs[0]["classifier.6.weight"].shape[0] == 10  # seed 001: 10 ImageNet classes
    for name, tensor in runs[0].items():
        torch.testing.assert_close(runs[1][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_vgg_parameters_loss_and_clock_are_named() -> None:
    with pytest.raises(ConfigError, match="width"):
        _runner("vgg11", {"width": 0})
    torch.set_num_threads(2)
    try:
        with pytest.raises(ConfigError, match="--clock thread: needs one torch thread"):
            IterationRunner(
                ProfileSettings(clock="thread", tile=16),
                SingleBackend(LaunchEnv("single", 0, 0, 1)),
                torch.device("cpu"),
            )
    finally:
        torch.set_num_threads(1)
    backend = SingleBackend(LaunchEnv("single", 0, 0, 1))
    with pytest.raises(ConfigError, match="--loss 'bce'"):
        IterationRunner(ProfileSettings(model="vgg11", loss="bce"), backend, torch.device("cpu"))


def test_clock_is_wall_time_on_cpu_and_cuda_events_on_a_gpu() -> None:
    assert isinstance(clock_for(torch.device("cpu")), WallClock)
    assert isinstance(clock_for(torch.device("cuda", 0)), CudaClock)
    # A clock whose marks are opaque objects resolved only after synchronize (as CUDA events are):
    # the profiler must keep marks and resolve them late, never do arithmetic on them early.

    class DeferredClock:
        def __init__(self) -> None:
            self.synchronized = False

        def mark(self) -> list[float]:
            import time

            return [time.perf_counter()]

        def seconds(self, start: list[float], end: list[float]) -> float:
            assert self.synchronized, "a mark was read before the clock synchronised"
            return end[0] - start[0]

        def synchronize(self) -> None:
            self.synchronized = True

    model = _runner("counter-fcrn", {"base_channels": 4}, profiling=False, tile=16).model
    clock = DeferredClock()
    profiler = LayerProfiler(model, clock)
    with profiler.functions("between"):
        output = model(torch.randn(1, 3, 16, 16))
    output.sum().backward()
    clock.synchronize()
    times = profiler.take()
    profiler.remove()
    assert times["between:interpolate"][0] > 0 and times["between:interpolate"][1] > 0
