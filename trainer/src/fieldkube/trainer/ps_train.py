"""fieldkube-train's model, data, loss and optimizer under parameter servers; fieldkube-scale starts it.

    python -m torch.distributed.run --nproc-per-node 3 -m fieldkube.trainer.ps_train \\
        --workers 2 --servers 1 --mode sync --data data/field --set train.max_steps=20

Ranks 0..W-1 are workers, the rest servers (`fieldkube.trainer.ps`). Everything that decides the
result comes from the trainer's own modules, so a parameter-server run is comparable with an allreduce
run of the same config: the model and its initial weights (seeded), the per-rank slices of every global
batch (`epoch_batches`), the loss, the optimizer and its lr schedule (`make_scheduler`, linear scaling
by the batch each update averages: the global batch when synchronous, one worker's batch when
asynchronous, whose schedule then counts W updates per step). Worker 0
writes what fieldkube-train writes (model bundle, summary.json, loss_curve.json) plus the servers'
staleness figures. Buffers (BatchNorm statistics) are not exchanged: the bundle holds worker 0's.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from fieldkube.contract.config import TrainingConfig, load_config
from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.errors import ConfigError, DataError, TrainerError
from fieldkube.trainer.loader import BatchPlan, make_loader
from fieldkube.trainer.loop import (
    LoopState,
    build_task_model,
    make_optimizer,
    make_scheduler,
    open_datasets,
    plan_steps,
)
from fieldkube.trainer.losses import resolve_loss
from fieldkube.trainer.ps import ParameterServer, WorkerExchange, shard_parameters
from fieldkube.trainer.tracking import Tracker

log = logging.getLogger("fieldkube.ps")
MODES = ("sync", "async")


def merged_curve(per_worker: list[list[list[float]]], mode: str) -> list[list[float]]:
    """[seconds, global step, loss] per global batch (one batch of every worker), as fieldkube-train logs:
    synchronous steps line up by index; asynchronous batches are taken in the order they finished, W at
    a time."""
    workers = len(per_worker)
    if mode == "sync":
        steps = min(len(c) for c in per_worker)
        return [
            [max(c[i][0] for c in per_worker), i + 1, statistics.fmean(c[i][2] for c in per_worker)]
            for i in range(steps)
        ]
    events = sorted((e for c in per_worker for e in c), key=lambda e: e[0])
    return [
        [
            events[i + workers - 1][0],
            i // workers + 1,
            statistics.fmean(e[2] for e in events[i : i + workers]),
        ]
        for i in range(0, len(events) - workers + 1, workers)
    ]


def _shard_optimizer(
    config: TrainingConfig, model: torch.nn.Module, owned: set[int]
) -> torch.optim.Optimizer:
    """The trainer's optimizer restricted to this server's parameters, its parameter groups (and their
    `frozen` marks) kept: the optimizers the trainer uses update each parameter on its own, so a shard's
    update equals the full one's."""
    full = make_optimizer(config, model)
    groups = []
    for group in full.param_groups:
        mine = [p for p in group["params"] if id(p) in owned]
        if mine:
            groups.append({**group, "params": mine})
    optimizer: torch.optim.Optimizer = cast(Any, type(full))(groups)
    return optimizer


def run_ps(config: TrainingConfig, workers: int, servers: int, mode: str, staleness: int) -> None:
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    dist.init_process_group(backend="gloo")
    try:
        if dist.get_world_size() != workers + servers:
            raise ConfigError(
                f"--workers {workers} --servers {servers}: the launcher started {dist.get_world_size()} "
                f"processes, expected {workers + servers}"
            )
        _run(config, dist.get_rank(), workers, servers, mode, staleness)
    finally:
        dist.destroy_process_group()


def _run(config: TrainingConfig, rank: int, workers: int, servers: int, mode: str, staleness: int) -> None:
    t = config.train
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    model, task = build_task_model(config)
    train_set, _, test_set, data_task, tile = open_datasets(config)
    if task not in ("custom", data_task):
        raise ConfigError(
            f"model.name {config.model.name!r} is a {task} but {config.data.path} holds {data_task}"
        )
    global_batch, spe, total_steps = plan_steps(config, workers, len(train_set))
    params = list(model.parameters())
    if len(params) < servers:
        raise ConfigError(f"--ps {servers}: the model has only {len(params)} parameter tensors to shard")
    shards = shard_parameters([p.numel() for p in params], servers)
    if rank >= workers:
        server = rank - workers
        updates_per_step = 1 if mode == "sync" else workers
        update_batch = global_batch if mode == "sync" else global_batch // workers
        optimizer = _shard_optimizer(config, model, {id(params[i]) for i in shards[server]})
        # the trainer's schedule (warm-up, constant or cosine, frozen groups), counted in server updates
        scheduler = make_scheduler(
            config,
            optimizer,
            spe * updates_per_step,
            total_steps * updates_per_step,
            update_batch / t.batch_size if t.lr_scaling == "linear" else 1.0,
        )
        ps = ParameterServer(
            [params[i] for i in shards[server]], optimizer, scheduler.step, workers, total_steps
        )
        dist.barrier()
        began = time.perf_counter()
        ps.serve_sync() if mode == "sync" else ps.serve_async(staleness)
        stats = {
            "role": "server",
            "server": server,
            "seconds": time.perf_counter() - began,
            **ps.stats.summary(),
        }
        log.info("server %d: %s", server, {k: v for k, v in stats.items() if k != "staleness_histogram"})
        dist.gather_object(stats, None, dst=0)
        return
    _, loss_fn = resolve_loss(t.loss, task)
    exchange = WorkerExchange(params, shards, first_server=workers)
    dist.barrier()
    started = time.perf_counter()
    exchange.pull()
    wait_start = time.perf_counter()
    curve: list[list[float]] = []
    steady_images, steady_seconds, steady_wait = 0, 0.0, 0.0
    model.train()
    plan = BatchPlan(len(train_set), global_batch, rank, workers, t.seed, t.epochs, total_steps)
    loader = make_loader(train_set, plan, config.data.loader_workers, config.data.prefetch)
    layout = torch.channels_last if config.runtime.channels_last else torch.contiguous_format
    for step, (inputs, targets, _) in enumerate(loader, start=1):
        step_start = time.perf_counter()
        model.zero_grad()
        # the layout the allreduce trainer feeds (loop.py)
        loss = loss_fn(model(inputs.contiguous(memory_format=layout)).float(), targets)
        if not torch.isfinite(loss):
            raise DataError(f"loss became {float(loss)} at step {step - 1} (train.lr {t.lr} too high?)")
        loss.backward()
        exchange.push_pull()
        now = time.perf_counter()
        curve.append([round(now - started, 4), step, float(loss.detach())])
        if step > 1:
            steady_images += inputs.shape[0]
            steady_seconds += now - wait_start
            steady_wait += step_start - wait_start
        if rank == 0 and (step % t.log_every_steps == 0 or step == total_steps):
            eta = (now - started) / step * (total_steps - step)
            log.info(
                "worker 0 step %d/%d (%.1f%%) loss %.5g | %.1f img/s/worker, exchange %.0f%% | ETA %.0fs",
                step,
                total_steps,
                100.0 * step / total_steps,
                curve[-1][2],
                steady_images / steady_seconds if steady_seconds else float("nan"),
                100 * exchange.exchange_seconds / max(now - started, 1e-9),
                eta,
            )
        wait_start = time.perf_counter()
    if rank == 0:
        exchange.pull()  # the weights after every worker's last update
    elapsed = time.perf_counter() - started
    mine = {
        "role": "worker",
        "curve": curve,
        "images": steady_images,
        "seconds": steady_seconds,
        "wait": steady_wait,
        "exchange_seconds": exchange.exchange_seconds,
        "elapsed": elapsed,
    }
    gathered: list[Any] | None = [None] * (workers + servers) if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        assert gathered is not None
        _write_results(
            config, model, task, tile, test_set, gathered, workers, servers, mode, staleness, total_steps
        )


def _write_results(
    config: TrainingConfig,
    model: torch.nn.Module,
    task: str,
    tile: int,
    test_set: Any,
    gathered: list[Any],
    workers: int,
    servers: int,
    mode: str,
    staleness: int,
    total_steps: int,
) -> None:
    from fieldkube.trainer.finish import finish_run

    worker_stats = [g for g in gathered if g["role"] == "worker"]
    server_stats = sorted((g for g in gathered if g["role"] == "server"), key=lambda g: g["server"])
    observed = sum(s["updates"] for s in server_stats)
    rate = sum(w["images"] / w["seconds"] for w in worker_stats if w["seconds"] > 0)
    wall = max(w["elapsed"] for w in worker_stats)
    curve = merged_curve([w["curve"] for w in worker_stats], mode)
    output_dir = Path(config.output_dir)
    write_json_atomic(output_dir / "loss_curve.json", curve)
    trained = {
        "world_size": workers,
        "servers": servers,
        "backend": f"ps-{mode}",
        "global_batch": config.train.batch_size * workers
        if config.train.batch_mode == "per_worker"
        else config.train.batch_size,
        "steps": total_steps,
        "seconds_this_run": round(wall, 3),
        "train_images_per_second": rate or None,
        "loader_wait_share": worker_stats[0]["wait"] / worker_stats[0]["seconds"]
        if worker_stats[0]["seconds"]
        else None,
        "exchange_share": statistics.fmean(
            w["exchange_seconds"] / max(w["elapsed"], 1e-9) for w in worker_stats
        ),
        "staleness_bound": staleness if mode == "async" else 0,
        "staleness_mean": sum(s["staleness_mean"] * s["updates"] for s in server_stats) / max(observed, 1),
        "staleness_max": max(s["staleness_max"] for s in server_stats),
        "server_updates": [s["updates"] for s in server_stats],
        "server_apply_seconds": [s["apply_seconds"] for s in server_stats],
    }
    log.info(
        "ps-%s with %d worker(s), %d server(s): %.2f img/s, staleness mean %.2f max %d",
        mode,
        workers,
        servers,
        rate,
        trained["staleness_mean"],
        trained["staleness_max"],
    )
    finish_run(
        config,
        model,
        task,
        tile,
        test_set,
        LoopState(global_step=total_steps),
        Tracker(config, enabled=False),
        torch.device("cpu"),
        None,
        trained,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldkube.trainer.ps_train", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--servers", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--staleness", type=int, default=0, help="async: versions a gradient may lag")
    parser.add_argument("--data", help="shortcut for data.path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s [rank {rank}] %(name)s %(message)s"
    )
    args = _parser().parse_args(argv)
    overrides = [*args.overrides, *([f"data.path={args.data}"] if args.data else [])]
    try:
        if args.workers < 1 or args.servers < 1 or args.staleness < 0:
            raise ConfigError("--workers, --servers: expected >= 1; --staleness: expected >= 0")
        run_ps(load_config(None, overrides), args.workers, args.servers, args.mode, args.staleness)
    except TrainerError as exc:
        print(f"fieldkube.trainer.ps_train: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
