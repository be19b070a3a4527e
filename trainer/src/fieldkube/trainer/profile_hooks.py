"""Per-layer forward, backward and optimizer timing from hooks, so a profile costs little and misses little.

Seed 001 profiled every layer through a trace profiler: +235-245 % iteration time, and the sum of its
layer times missed 38-54 % of the measured iteration. Here each leaf module gets a forward pre-hook and
post-hook; at forward time the post-hook also hooks the autograd node that produced the layer's output
(`grad_fn.register_prehook` / `register_hook`), so the backward time of exactly that layer's kernel is
bracketed too, and each layer's parameters are stepped by their own optimizer (element-wise optimizers
such as Adam/SGD give the same update per parameter either way), so optimizer time is per layer as well.

What runs outside any leaf layer is timed too, so the rows add up to the iteration: a `TorchFunctionMode`
(`functions(label)`, entered around the forward and the loss) times each torch function called while no
leaf layer is running (FCRN's `interpolate`, U-Net's `max_pool2d`/`pad`/`cat`, MCNN's `cat`, VGG's
`flatten`, the loss's arithmetic) and hooks its autograd node like a layer's, as a row `<label>:<name>`.
Inside a layer the mode only passes the call through (a counter says whether a layer is open), so it adds
one Python call per torch function and nothing per tensor.

The profiler's own bookkeeping after a forward mark (hooking the autograd node, recording the row) is
bracketed as well and reported as the row `(profiler)` of kind `profiler`, so its cost is shown rather
than left in a gap. The backward phase's edges are rows of kind `autograd`: `(backward start)`, from
`backward()` to the first node (the engine readying the graph), and `(backward end)`, from the last node
or gradient accumulation to the return, where the engine releases the graph (saved activations freed:
on CPU this is where memory goes back to the system, a few ms now and then).

Times come from a `Clock`: wall time (`time.perf_counter`) on CPU, where kernels run synchronously, and
CUDA events on a GPU, where they do not; event pairs are resolved after the iteration's synchronise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle


class Clock(Protocol):
    """Marks points in time and turns pairs of marks into seconds once the work is complete."""

    def mark(self) -> Any: ...

    def seconds(self, start: Any, end: Any) -> float: ...

    def synchronize(self) -> None: ...


class WallClock:
    """CPU: kernels finish before the call returns, so wall time brackets the work itself."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def synchronize(self) -> None:
        return None


class ThreadClock(WallClock):
    """CPU, one torch thread: the training thread's CPU time, so time other processes take from a shared
    machine (a preempted thread) is in no row. Only when all compute runs in the calling thread."""

    def mark(self) -> float:
        return time.thread_time()


class CudaClock:
    """GPU: kernels are queued; CUDA events recorded on the current stream time them on the device."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return float(start.elapsed_time(end)) / 1000.0

    def synchronize(self) -> None:
        torch.cuda.synchronize()


def clock_for(device: torch.device, kind: str = "wall") -> Clock:
    """CUDA events on a GPU; on CPU wall time, or the thread's CPU time (`kind="thread"`)."""
    if device.type == "cuda":
        return CudaClock()
    return ThreadClock() if kind == "thread" else WallClock()


def leaf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules without children (conv, relu, pool, ...), in definition order; Identity skipped."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and not any(True for _ in module.children()) and not isinstance(module, nn.Identity)
    ]


PROFILER_ROW = "(profiler)"
BACKWARD_START_ROW = "(backward start)"
BACKWARD_END_ROW = "(backward end)"


@dataclass
class LayerTimes:
    """One iteration's marks per layer; resolved to seconds after the iteration synchronises."""

    forward: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    backward: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    optimizer: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    bookkeeping: list[tuple[Any, Any]] = field(default_factory=list)
    backward_first: Any = None  # first mark taken inside the backward pass
    backward_last: Any = None  # last mark taken inside it (a node finished, a gradient accumulated)

    def resolve(
        self, clock: Clock, names: list[str], backward: tuple[Any, Any] | None = None
    ) -> dict[str, tuple[float, float, float]]:
        """{layer: (forward s, backward s, optimizer s)}; a layer called twice sums its calls. Given the
        backward phase's marks, also its start and end rows (before the first node, after the last)."""

        def total(marks: dict[str, list[tuple[Any, Any]]], name: str) -> float:
            return sum(clock.seconds(a, b) for a, b in marks.get(name, []))

        times = {
            name: (total(self.forward, name), total(self.backward, name), total(self.optimizer, name))
            for name in names
        }
        times[PROFILER_ROW] = (sum(clock.seconds(a, b) for a, b in self.bookkeeping), 0.0, 0.0)
        if backward is not None and self.backward_first is not None:
            times[BACKWARD_START_ROW] = (0.0, clock.seconds(backward[0], self.backward_first), 0.0)
            times[BACKWARD_END_ROW] = (0.0, clock.seconds(self.backward_last, backward[1]), 0.0)
        return times


class LayerProfiler:
    """Hooks every leaf layer of `model`; `iteration()` collects one iteration's layer times."""

    def __init__(self, model: nn.Module, clock: Clock) -> None:
        self.clock = clock
        self.layers = leaf_layers(model)
        self.names = [name for name, _ in self.layers]
        self.kinds = {name: type(module).__name__ for name, module in self.layers}
        self.kinds.update(
            {PROFILER_ROW: "profiler", BACKWARD_START_ROW: "autograd", BACKWARD_END_ROW: "autograd"}
        )
        self.current = LayerTimes()
        self._depth = 0  # leaf layers now running: functions called inside them belong to the layer
        self._open_forward: dict[str, Any] = {}
        self._hooked_nodes: set[Any] = set()
        self._handles: list[RemovableHandle] = []
        for name, module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._forward_start(name)))
            self._handles.append(module.register_forward_hook(self._forward_end(name)))
        for param in model.parameters():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._accumulated))

    def _forward_start(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._open_forward[name] = self.clock.mark()
            self._depth += 1

        return hook

    def _forward_end(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            end = self.clock.mark()
            self.current.forward.setdefault(name, []).append((self._open_forward.pop(name), end))
            self._hook_output(name, output)
            self._depth -= 1
            self.current.bookkeeping.append((end, self.clock.mark()))

        return hook

    def _hook_output(self, name: str, output: Any) -> None:
        tensor = _first_tensor(output)
        node = tensor.grad_fn if tensor is not None else None
        # A layer that returns its input unchanged (dropout in eval mode) shares the previous layer's
        # node: that backward kernel is counted once, for the layer that made it.
        if node is not None and node not in self._hooked_nodes:
            self._hooked_nodes.add(node)
            # The node is captured now: a later in-place op (ReLU(inplace=True)) replaces the output's
            # grad_fn but keeps this node in the graph, so it still brackets this layer's own kernel.
            self._hook_backward(name, node)

    def record_function(self, label: str, name: str, start: Any, end: Any, output: Any) -> None:
        """A torch function run outside every leaf layer: its forward marks and its autograd node."""
        row = f"{label}:{name}"
        if row not in self.kinds:
            self.names.append(row)
            self.kinds[row] = label
        self.current.forward.setdefault(row, []).append((start, end))
        self._hook_output(row, output)

    def functions(self, label: str) -> FunctionTimer:
        """Context manager timing torch functions called outside leaf layers as rows `<label>:<name>`."""
        return FunctionTimer(self, label)

    def _hook_backward(self, name: str, node: Any) -> None:
        opened: list[Any] = []

        def before(grad_outputs: Any) -> None:
            mark = self.clock.mark()
            opened.append(mark)
            if self.current.backward_first is None:
                self.current.backward_first = mark

        def after(grad_inputs: Any, grad_outputs: Any) -> None:
            mark = self.clock.mark()
            self.current.backward.setdefault(name, []).append((opened.pop(), mark))
            self.current.backward_last = mark

        node.register_prehook(before)
        node.register_hook(after)

    def _accumulated(self, param: torch.Tensor) -> None:
        self.current.backward_last = self.clock.mark()

    @contextmanager
    def optimizer_step(self, name: str) -> Iterator[None]:
        start = self.clock.mark()
        yield
        self.current.optimizer.setdefault(name, []).append((start, self.clock.mark()))

    def take(self, backward: tuple[Any, Any] | None = None) -> dict[str, tuple[float, float, float]]:
        """This iteration's per-layer seconds (call after the clock synchronised); starts the next one.
        `backward`: the marks that opened and closed the backward phase (for its start and end rows)."""
        resolved = self.current.resolve(self.clock, self.names, backward)
        self.current = LayerTimes()
        self._hooked_nodes.clear()
        return resolved

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return next((item for item in output if isinstance(item, torch.Tensor)), None)
    return None


class FunctionTimer(TorchFunctionMode):
    """Times the torch functions called while no leaf layer runs (see the module docstring).

    Calls that return no tensor (`.shape`, `size()`) are not recorded: they launch no kernel. While the
    handler runs, torch pops the mode, so a function's inner calls are part of its own time.
    """

    def __init__(self, profiler: LayerProfiler, label: str) -> None:
        super().__init__()
        self.profiler = profiler
        self.label = label

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        profiler = self.profiler
        if profiler._depth:
            return func(*args, **kwargs)
        start = profiler.clock.mark()
        output = func(*args, **kwargs)
        end = profiler.clock.mark()
        if _first_tensor(output) is not None:
            name = getattr(func, "__name__", type(func).__name__).strip("_") or "function"
            profiler.record_function(self.label, name, start, end, output)
            if self.label != "loss":  # the loss phase is accounted whole, bookkeeping included
                profiler.current.bookkeeping.append((end, profiler.clock.mark()))
        return output


def per_layer_optimizers(
    model: nn.Module, factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
) -> list[tuple[str, torch.optim.Optimizer]]:
    """One optimizer per leaf layer that owns parameters (plus one for parameters owned elsewhere)."""
    owned: set[int] = set()
    result = []
    for name, module in leaf_layers(model):
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            result.append((name, factory(params)))
            owned.update(id(p) for p in params)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    if rest:
        result.append(("(other parameters)", factory(rest)))
    return result
