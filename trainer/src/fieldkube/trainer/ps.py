"""Parameter-server training over torch.distributed point-to-point messages (seeds 000 and 003).

Seeds 000 and 003 compare ring allreduce with parameter servers; this is the parameter-server side,
built on `torch.distributed` send/recv (gloo on CPU) rather than a separate framework. Ranks 0..W-1 are
workers, ranks W..W+N-1 servers. The parameters are sharded whole over the servers (largest first onto
the least loaded), and each server owns the optimizer state of its shard.

Every step a worker sends each server the flat gradient of that server's shard (push) and receives the
shard's weights back (pull). A synchronous server waits for one gradient from every worker, averages
them and steps, so W workers compute the same updates as W allreduce ranks. An asynchronous server
applies each gradient as it arrives and answers the pull when `StalenessGate` allows it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def shard_parameters(sizes: list[int], servers: int) -> list[list[int]]:
    """Parameter indices per server: whole tensors, largest first onto the least loaded server.

    Deterministic, so every process computes the same assignment without exchanging it.
    """
    loads = [0] * servers
    shards: list[list[int]] = [[] for _ in range(servers)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(servers), key=lambda s: (loads[s], s))
        shards[target].append(index)
        loads[target] += sizes[index]
    return [sorted(shard) for shard in shards]


class StalenessGate:
    """When an asynchronous server may hand a worker fresh weights, so that no gradient it applies is more
    than `bound` versions stale.

    A gradient's staleness is the number of updates the server applied between the pull of the weights it
    was computed on and its own application. A worker whose release could let some gradient still being
    computed arrive more than `bound` versions behind waits (first come, first served) until that gradient
    is in: with `k` workers computing, each may still see the other `k - 1` gradients applied before its
    own, so a release needs `version - pulled + k - 1 <= bound` for every worker computing after it.
    Workers computing never wait on the gate, so a waiting worker is always released eventually. Bound 0
    makes the workers take turns (sequential SGD); a larger bound lets fast workers apply more updates
    while a slow worker's gradient is being computed.
    """

    def __init__(self, bound: int) -> None:
        if bound < 0:
            raise ValueError(f"staleness bound {bound}: expected >= 0")
        self.bound = bound
        self.version = 0
        self.computing: dict[int, int] = {}  # worker -> version its weights were pulled at
        self.waiting: deque[int] = deque()
        self.observed: list[int] = []

    def push(self, worker: int) -> int:
        """Record the application of `worker`'s gradient; returns its staleness."""
        staleness = self.version - self.computing.pop(worker)
        self.version += 1
        self.observed.append(staleness)
        return staleness

    def request(self, worker: int) -> None:
        self.waiting.append(worker)

    def _may_release(self) -> bool:
        pulled = [*self.computing.values(), self.version]
        return all(self.version - v + len(pulled) - 1 <= self.bound for v in pulled)

    def release(self) -> list[int]:
        """Workers that may pull now, in the order they asked; each then counts as computing."""
        released = []
        while self.waiting and self._may_release():
            worker = self.waiting.popleft()
            self.computing[worker] = self.version
            released.append(worker)
        return released


def _isend(tensor: torch.Tensor, dst: int) -> dist.Work:
    work = dist.isend(tensor, dst=dst)
    assert work is not None  # None only for ranks outside the group, and every rank is in the world
    return work


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def unflat_into(source: torch.Tensor, targets: list[torch.Tensor]) -> None:
    offset = 0
    for target in targets:
        target.copy_(source[offset : offset + target.numel()].view_as(target))
        offset += target.numel()


@dataclass
class ServerStats:
    """What a server saw: staleness per applied gradient and where its time went."""

    updates: int = 0
    staleness: list[int] = field(default_factory=list)
    apply_seconds: float = 0.0
    receive_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        s = self.staleness
        return {
            "updates": self.updates,
            "staleness_mean": round(sum(s) / len(s), 4) if s else 0.0,
            "staleness_max": max(s) if s else 0,
            "staleness_histogram": {str(k): s.count(k) for k in sorted(set(s))},
            "apply_seconds": round(self.apply_seconds, 3),
            "receive_seconds": round(self.receive_seconds, 3),
        }


class ParameterServer:
    """One shard's weights and optimizer; serves `workers` workers for `steps` pushes each."""

    def __init__(
        self,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        on_update: Callable[[], None],
        workers: int,
        steps: int,
    ) -> None:
        self.params = params
        self.optimizer = optimizer
        self.on_update = on_update  # the lr scheduler's step
        self.workers = workers
        self.steps = steps
        self.size = sum(p.numel() for p in params)
        self.stats = ServerStats()
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []

    def _reply(self, worker: int) -> None:
        """Send the current weights without blocking: a blocked send here could wait on a worker that is
        itself waiting on another server, which waits on this one's receive."""
        weights = flat(list(self.params)).clone()
        self._sends.append((_isend(weights, worker), weights))
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]

    def _apply(self, gradient: torch.Tensor) -> None:
        began = time.perf_counter()
        offset = 0
        for p in self.params:
            p.grad = gradient[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()
        self.on_update()
        self.stats.updates += 1
        self.stats.apply_seconds += time.perf_counter() - began

    def _receive(self, buffer: torch.Tensor, src: int | None) -> int:
        began = time.perf_counter()
        sender = dist.recv(buffer, src=src)
        self.stats.receive_seconds += time.perf_counter() - began
        return int(sender)

    def serve_sync(self) -> None:
        """Per round: one gradient from every worker (rank order), their mean applied once, weights to all."""
        for worker in range(self.workers):
            self._reply(worker)
        buffer = torch.zeros(self.size)
        for _ in range(self.steps):
            total = torch.zeros(self.size)
            for worker in range(self.workers):
                self._receive(buffer, worker)
                total += buffer / self.workers  # pre-divided and summed in rank order, as DDP reduces
            self._apply(total)
            self.stats.staleness.extend([0] * self.workers)
            for worker in range(self.workers):
                self._reply(worker)
        self._finish()

    def serve_async(self, bound: int) -> None:
        """Apply each gradient on arrival; answer pulls as the staleness gate allows."""
        gate = StalenessGate(bound)
        pushes = [0] * self.workers
        for worker in range(self.workers):
            gate.request(worker)
        for worker in gate.release():
            self._reply(worker)
        buffer = torch.zeros(self.size)
        for _ in range(self.workers * self.steps):
            worker = self._receive(buffer, None)
            self._apply(buffer)
            self.stats.staleness.append(gate.push(worker))
            pushes[worker] += 1
            if pushes[worker] < self.steps:
                gate.request(worker)
            else:
                self._reply(worker)  # its last pull: it computes nothing more, so the gate need not hold it
            for released in gate.release():
                self._reply(released)
        self._finish()

    def _finish(self) -> None:
        """Worker 0 gets the weights after every update (its last pull may predate others' last pushes)."""
        self._reply(0)
        for work, _ in self._sends:
            work.wait()
        self._sends = []


class WorkerExchange:
    """A worker's side: push each shard's gradient to its server, pull the shard's weights back."""

    def __init__(self, params: list[nn.Parameter], shards: list[list[int]], first_server: int) -> None:
        self.shards = [[params[i] for i in shard] for shard in shards]
        self.servers = [first_server + k for k in range(len(shards))]
        self.exchange_seconds = 0.0

    def pull(self) -> None:
        """Weights from every server, in server order (the order keeps gated pulls free of deadlock: a
        worker released by one server waits only on servers after it)."""
        with torch.no_grad():
            for shard, server in zip(self.shards, self.servers, strict=True):
                buffer = torch.zeros(sum(p.numel() for p in shard))
                dist.recv(buffer, src=server)
                unflat_into(buffer, [p.data for p in shard])

    def push_pull(self) -> None:
        began = time.perf_counter()
        sends = []
        for shard, server in zip(self.shards, self.servers, strict=True):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in shard]
            gradient = flat(grads).contiguous()
            sends.append((_isend(gradient, server), gradient))
        self.pull()
        for work, _ in sends:
            work.wait()
        self.exchange_seconds += time.perf_counter() - began
