"""The training loop shared by every backend: schedule, steps, validation, early stop, checkpoints, logs.

`run_training(config)` is what each rank of a TrainingJob runs. Data order, augmentation, LR schedule
and initial weights depend only on the config (never on the rank count), so W ranks with a global batch
B compute the same updates as one rank with batch B; checkpoints hold everything needed to continue
bit-for-bit (weights, optimizer, scheduler, RNG, epoch/step position, early-stop state, MLflow run id).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fieldkube.contract.config import TrainingConfig
from fieldkube.contract.names import (
    IMAGES_PER_SECOND,
    PROGRESS_EPOCH,
    PROGRESS_PERCENT,
    PROGRESS_STEP,
    TRAIN_LOSS,
)
from fieldkube.trainer import checkpoint as ckpt
from fieldkube.trainer.augment import RawBatch
from fieldkube.trainer.backends import AnyBackend, create_backend, pin_device
from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.early_stopping import EarlyStopping
from fieldkube.trainer.errors import ConfigError, DataError
from fieldkube.trainer.freezing import frozen_factor, split_frozen
from fieldkube.trainer.heap import keep_freed_memory
from fieldkube.trainer.init_source import (
    InitSource,
    adopt_architecture,
    adopt_density_scale,
    fetch_init_source,
)
from fieldkube.trainer.launch_env import detect_launch_env
from fieldkube.trainer.loader import (
    BatchPlan,
    LoadedBatch,
    PreparedDataset,
    SampleKey,
    make_loader,
    steps_per_epoch,
)
from fieldkube.trainer.losses import LossFn, resolve_loss
from fieldkube.trainer.metrics import TrainingMetrics
from fieldkube.trainer.precision import PrecisionPlan, device_precision
from fieldkube.trainer.step import TrainStep
from fieldkube.trainer.throughput import ThroughputMeter, Window, peak_tflops, train_flops_per_image
from fieldkube.trainer.tracking import Tracker, lineage_tags

log = logging.getLogger("fieldkube.train")


@dataclass
class LoopState:
    """Position and bookkeeping saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    init_lineage: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainingResult:
    state: LoopState
    model: nn.Module
    stopped_early: bool
    report: dict[str, Any]
    output_dir: Path
    registered: dict[str, Any] | None


class _UserDatasetByKey(Dataset[Any]):
    """Adapts a user Dataset (indexed by int) to the (epoch, index) keys of the batch plan."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.task = "custom"
        self.tile = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: SampleKey) -> Any:
        return self.inner[key[1]]


class _Stop:
    """SIGTERM (Kubernetes pod deletion) asks for a checkpoint at the next step boundary, then exit."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def build_task_model(config: TrainingConfig) -> tuple[nn.Module, str]:
    """The model and its task ('counter', 'segmenter' or 'custom' for user code)."""
    name = config.model.name
    if ":" in name:
        from fieldkube.trainer.usercode import load_user_model

        return load_user_model(name, config.model.user_code_dir, config.model.params), "custom"
    from fieldkube.vision.models import UnknownModelError, build_model, task_of

    try:
        model = build_model(name, **config.model.params)
    except UnknownModelError as exc:
        raise ConfigError(f"model.name/model.params: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.params for {name}: {exc}") from None
    return model, task_of(name)


def _start_from_source(
    config: TrainingConfig, backend: AnyBackend
) -> tuple[TrainingConfig, InitSource | None]:
    """For model.init_from: rank 0 fetches the source, every rank gets it and adopts its architecture."""
    source = config.model.init_from
    if source is None:
        return config, None
    init = fetch_init_source(config) if backend.rank == 0 else None
    init = backend.broadcast_object(init) if backend.size > 1 else init
    assert init is not None
    adapted = config.model_copy(
        update={
            "model": adopt_architecture(config.model, init.spec, source),
            "data": adopt_density_scale(config.data, init.spec, source),
        }
    )
    return adapted, init


def open_datasets(config: TrainingConfig) -> tuple[Any, Any, Any, str, int]:
    """(train, validation, test, task, tile); validation is the val split, else the test split."""
    data = config.data
    seed = config.train.seed
    if data.dataset:
        from fieldkube.trainer.usercode import load_user_dataset

        code_dir = config.model.user_code_dir
        user_train = _UserDatasetByKey(load_user_dataset(data.dataset, code_dir, data.path, "train"))
        user_val = _UserDatasetByKey(load_user_dataset(data.dataset, code_dir, data.path, "val"))
        return user_train, user_val, None, "custom", 0
    train_set = PreparedDataset(data.path, "train", data, seed, augment=True)
    splits = train_set.manifest["splits"]
    test = PreparedDataset(data.path, "test", data, seed, augment=False) if "test" in splits else None
    val = PreparedDataset(data.path, "val", data, seed, augment=False) if "val" in splits else test
    return train_set, val, test, train_set.task, train_set.tile


def make_optimizer(config: TrainingConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer; the layer groups in model.freeze go into a parameter group marked frozen."""
    t = config.train
    trainable, frozen = split_frozen(model, config.model.freeze)
    params: list[dict[str, Any]] = [{"params": trainable, "frozen": False}] if trainable else []
    if frozen:
        params.append({"params": frozen, "frozen": True})
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(
    step: int,
    scale: float,
    warmup_steps: int,
    schedule: str = "constant",
    total_steps: int = 0,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base lr: linear warm-up from 1 to `scale` over `warmup_steps`, then `scale`
    (constant) or a half cosine from `scale` down to `min_factor * scale` at `total_steps` (cosine).

    A decaying rate lets the last steps average out the noise of small batches instead of ending wherever
    the last few updates threw the weights; with a handful of images this decides what a run ends at.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return 1.0 + (scale - 1.0) * step / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return scale
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return scale * (min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def plan_steps(config: TrainingConfig, workers: int, train_samples: int) -> tuple[int, int, int]:
    """(global batch, steps per epoch, total steps) of a run over ``workers`` processes, or the one-line
    error that makes it impossible; every data-parallel path (ranks, parameter-server workers) counts so."""
    t = config.train
    global_batch = t.batch_size * workers if t.batch_mode == "per_worker" else t.batch_size
    if global_batch % workers:
        raise ConfigError(
            f"train.batch_size {t.batch_size} (global) is not divisible by the {workers} workers"
        )
    spe = steps_per_epoch(train_samples, global_batch)
    if spe == 0:
        raise DataError(
            f"{config.data.path}: train split has {train_samples} samples, fewer than one global batch "
            f"of {global_batch} (train.batch_size)"
        )
    total_steps = t.epochs * spe if t.max_steps is None else min(t.max_steps, t.epochs * spe)
    return global_batch, spe, total_steps


def make_scheduler(
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    total_steps: int,
    scale: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule of every parameter group (warm-up, constant or cosine; frozen groups at 0 until
    model.freeze_epochs end); a function of the global step only, so a resumed run continues exactly."""
    t = config.train
    warmup_steps = round(t.warmup_epochs * steps_per_epoch)
    freeze_steps = config.model.freeze_epochs * steps_per_epoch

    def base_factor(step: int) -> float:
        return lr_factor(step, scale, warmup_steps, t.lr_schedule, total_steps, t.lr_min_factor)

    factors = [
        frozen_factor(base_factor, freeze_steps) if group.get("frozen") else base_factor
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _user_loss(model: nn.Module) -> LossFn:
    loss: LossFn = _unwrap(model).loss  # type: ignore[assignment]
    return loss


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def validate(
    model: nn.Module,
    dataset: Any,
    loss_fn: LossFn,
    backend: AnyBackend,
    batch: int,
    device: torch.device,
    precision: PrecisionPlan,
) -> dict[str, float]:
    """Mean validation loss (and a user model's `metrics(output, target)`) over the whole split; rank r
    scores samples r, r+W, ... and the sums are allreduced."""
    model.eval()
    user_metrics = getattr(_unwrap(model), "metrics", None)
    mine = list(range(backend.rank, len(dataset), backend.size))
    batches = [[(-1, i) for i in mine[k : k + batch]] for k in range(0, len(mine), batch)]
    sums: dict[str, float] = {"val_loss": 0.0}
    autocast = torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast)
    with torch.no_grad(), autocast:
        for keys in batches:
            inputs, targets = _fetch(dataset, keys, device)
            output = model(inputs).float()
            sums["val_loss"] += float(loss_fn(output, targets)) * len(keys)
            if callable(user_metrics):
                for name, value in dict(user_metrics(output, targets)).items():
                    sums[f"val_{name}"] = sums.get(f"val_{name}", 0.0) + float(value) * len(keys)
    names = sorted(sums)
    reduced = backend.allreduce_sum([sums[n] for n in names] + [float(len(mine))])
    model.train()
    return {name: value / max(reduced[-1], 1.0) for name, value in zip(names, reduced[:-1], strict=True)}


def _fetch(dataset: Any, keys: list[SampleKey], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of ``keys`` on ``device`` (a prepared dataset's batch is finished there)."""
    if isinstance(dataset, PreparedDataset):
        return dataset.finish(dataset.__getitems__(keys).to(device))
    items = [dataset[k] for k in keys]
    inputs = torch.stack([i[0] for i in items]).to(device)
    targets = torch.stack([torch.as_tensor(i[1]) for i in items]).to(device)
    return inputs, targets


def _on_device(
    batch: Any, dataset: Any, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """A loader batch as (inputs, targets, loader CPU seconds) on ``device``: raw batches are moved,
    then finished there; a user dataset's batches carry no CPU figure."""
    cpu_s: float | None = None
    if isinstance(batch, RawBatch):
        inputs, targets = dataset.finish(batch.to(device, non_blocking=True))
        cpu_s = batch.loader_cpu_s
    elif isinstance(batch, LoadedBatch):
        inputs, targets, cpu_s = batch.inputs.to(device), batch.targets.to(device), batch.loader_cpu_s
    else:
        inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets, cpu_s


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


def run_training(config: TrainingConfig) -> TrainingResult:
    """Train on this rank until done, early-stopped or interrupted; rank 0 also evaluates and registers."""
    env = detect_launch_env()
    keep_freed_memory()
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    wanted = config.runtime.device
    device = pin_device(wanted, env.local_rank, f"runtime.device {wanted!r}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed tile and batch: autotuned kernels pay off
    backend = create_backend(config.runtime.backend, env, device)
    try:
        return _train(config, backend, device)
    finally:
        backend.shutdown()


def _restore(
    config: TrainingConfig,
    backend: AnyBackend,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: LoopState,
) -> tuple[LoopState, bool]:
    """Continue from the newest checkpoint if there is one (rank 0 reads it, every rank loads it)."""
    if not (config.checkpoint.dir and config.checkpoint.resume):
        return state, False
    saved = ckpt.load_latest(config.checkpoint.dir) if backend.rank == 0 else None
    saved = backend.broadcast_object(saved) if backend.size > 1 else saved
    if saved is None:
        return state, False
    _unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and "scaler" in saved:
        scaler.load_state_dict(saved["scaler"])
    ckpt.restore_rng(saved["rng"])
    return LoopState(**saved["loop"]), True


def _train(config: TrainingConfig, backend: AnyBackend, device: torch.device) -> TrainingResult:
    t = config.train
    chief = backend.rank == 0
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    config, init = _start_from_source(config, backend)
    model, task = build_task_model(config)
    if init is not None:
        model.load_state_dict(init.weights, strict=True)
    train_set, val_set, test_set, data_task, tile = open_datasets(config)
    if task not in ("custom", data_task):
        raise ConfigError(
            f"model.name {config.model.name!r} is a {task} but {config.data.path} holds {data_task} data"
        )
    precision = device_precision(config.runtime.precision, device)
    flops_per_image = train_flops_per_image(model, tile)
    model = model.to(device)
    # channels_last inputs on every device: convolutions then run in that layout (cuDNN's fastest kernels
    # on a GPU; oneDNN's on a CPU, 1.2-1.9x faster per step for these models, bench/README.md) and their
    # activations stay in it. The parameters keep the contiguous layout: their gradients, which autograd
    # lays out like the parameters, stay contiguous, as Horovod requires of every tensor it reduces (a
    # channels_last model fails there: "Tensor is required to be contiguous"); measured here, the inputs
    # alone get most of the speed-up of converting the model too (1.16-1.93x against 1.26-1.98x).
    channels_last = config.runtime.channels_last
    global_batch, spe, total_steps = plan_steps(config, backend.size, len(train_set))
    scale = global_batch / t.batch_size if t.lr_scaling == "linear" else 1.0
    loss_name, loss_fn = ("user", _user_loss(model)) if task == "custom" else resolve_loss(t.loss, task)
    # Wrap first: Horovod's DistributedOptimizer is a new optimizer object that takes the param groups but
    # not the state, so a checkpoint's optimizer state (Adam's moments) must be loaded into the wrapper.
    model, optimizer = backend.wrap(model, make_optimizer(config, model))
    scheduler = make_scheduler(config, optimizer, spe, total_steps, scale)
    scaler = torch.amp.GradScaler("cuda") if precision.loss_scaling else None

    state = LoopState(init_lineage=dict(init.lineage) if init is not None else {})
    state, resumed = _restore(config, backend, model, optimizer, scheduler, scaler, state)
    backend.broadcast_initial_state(_unwrap(model), optimizer)
    # Compiled after the weights are final: the compiled module shares the parameters it wraps.
    forward = torch.compile(model) if config.runtime.compile and device.type == "cuda" else model
    train_step = TrainStep(forward, optimizer, scheduler, loss_fn, backend, precision, scaler, t.lr)

    tracker = Tracker(config, enabled=chief)
    extra = {
        "world_size": backend.size,
        "backend": backend.name,
        "global_batch": global_batch,
        "lr_scale": scale,
        "loss_resolved": loss_name,
        "device": str(device),
        "task": task,
        "precision": precision.name,
        "train_gflops_per_image": round(flops_per_image / 1e9, 3) if flops_per_image else None,
    }
    state.run_id = tracker.start(config, state.run_id if resumed else None, extra) or state.run_id
    if not resumed:
        tracker.set_tags(lineage_tags(state.init_lineage))
    metrics = TrainingMetrics(
        backend.rank, config.tracking.run_name or "fieldkube", device.index if device.type == "cuda" else None
    )
    if config.metrics.port:
        metrics.serve(config.metrics.port + backend.local_rank, config.metrics.address)

    stop = _Stop()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    if chief:
        log.info(
            "training %s (%s, loss %s) on %d %s rank(s) [%s] in %s: %d samples, global batch %d, "
            "%d steps/epoch, %d steps total, lr %.3g x %.3g (%s)%s",
            config.model.name,
            task,
            loss_name,
            backend.size,
            device.type,
            backend.name,
            precision.name,
            len(train_set),
            global_batch,
            spe,
            total_steps,
            t.lr,
            scale,
            t.lr_schedule,
            f", resumed at step {state.global_step}" if resumed else "",
        )

    def save(position: LoopState) -> None:
        if not (chief and config.checkpoint.dir):
            return
        payload: dict[str, Any] = {
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "loop": asdict(position),
        }
        if scaler is not None:
            payload["scaler"] = scaler.state_dict()
        path = ckpt.save_checkpoint(
            config.checkpoint.dir, position.global_step, payload, config.checkpoint.keep
        )
        log.info("checkpoint saved: %s", path)

    policy = ckpt.CheckpointPolicy(config.checkpoint.every_steps, config.checkpoint.every_epochs)
    early = EarlyStopping(t.early_stopping_patience or 0, t.early_stopping_min_delta)
    peak = peak_tflops(device, config.runtime.peak_tflops)
    meter = ThroughputMeter(backend.size, flops_per_image, peak)
    stopped_early = False
    interrupted = False
    loader_cpu_s, loader_samples = 0.0, 0
    # (seconds since start, global step, global-batch loss) at every log point: time to a target loss
    loss_curve: list[list[float]] = []
    plan = BatchPlan(
        len(train_set),
        global_batch,
        backend.rank,
        backend.size,
        t.seed,
        t.epochs,
        total_steps,
        state.epoch,
        state.step_in_epoch,
    )
    batches = iter(make_loader(train_set, plan, config.data.loader_workers, config.data.prefetch, device))
    model.train()
    try:
        while state.epoch < t.epochs and state.global_step < total_steps and not interrupted:
            meter.epoch_starts()
            while state.step_in_epoch < spe and state.global_step < total_steps:
                wait_start = time.perf_counter()
                batch = next(batches)
                step_start = time.perf_counter()
                inputs, targets, cpu_s = _on_device(batch, train_set, device, channels_last)
                loss_value = train_step(inputs, targets, state.global_step)
                step_s = time.perf_counter() - step_start
                wait_s = step_start - wait_start
                state.step_in_epoch += 1
                state.global_step += 1
                state.epoch_loss_sum += loss_value
                state.epoch_loss_steps += 1
                meter.step(inputs.shape[0], wait_s, step_s)
                if cpu_s is not None:
                    loader_cpu_s, loader_samples = loader_cpu_s + cpu_s, loader_samples + inputs.shape[0]
                metrics.observe_step(
                    inputs.shape[0], step_s, wait_s, loss_value, state.epoch, backend.last_allreduce_s
                )
                if state.global_step % t.log_every_steps == 0 or state.global_step == total_steps:
                    # the loss of the whole global batch (mean over ranks), as one rank would see it
                    loss_value = backend.allreduce_sum([loss_value])[0] / backend.size
                    window = meter.window()
                    metrics.observe_window(window.images_per_second / backend.size, window.mfu)
                    elapsed = time.perf_counter() - meter.started
                    loss_curve.append([round(elapsed, 3), state.global_step, loss_value])
                    if chief:
                        _log_progress(
                            state, t.epochs, spe, total_steps, loss_value, scheduler, window, elapsed
                        )
                        _log_progress_metrics(tracker, state, total_steps, loss_value, scheduler, window)
                if policy.after_step(state.global_step, stop.requested):
                    save(state)
                if stop.requested:
                    interrupted = True
                    break
            if interrupted or state.step_in_epoch < spe:
                break
            epoch_summary = {
                "epoch": float(state.epoch + 1),
                "train_loss_epoch": backend.allreduce_sum([state.epoch_loss_sum])[0]
                / backend.size
                / max(state.epoch_loss_steps, 1),
            }
            if val_set is not None and len(val_set):
                per_rank = max(1, global_batch // backend.size)
                epoch_summary.update(validate(model, val_set, loss_fn, backend, per_rank, device, precision))
            state.history.append(epoch_summary)
            tracker.log_metrics(
                {k: v for k, v in epoch_summary.items() if k != "epoch"}, step=state.global_step
            )
            if chief:
                log.info(
                    "epoch %d done: %s",
                    state.epoch + 1,
                    ", ".join(f"{k} {v:.5g}" for k, v in epoch_summary.items() if k != "epoch"),
                )
            state.epoch += 1
            state.step_in_epoch = 0
            state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
            if "val_loss" in epoch_summary and early.patience:
                state.best_val, state.bad_epochs, stopped_early = early.update(
                    state.best_val, state.bad_epochs, epoch_summary["val_loss"]
                )
            if policy.after_epoch(state.epoch):
                save(state)
            if stopped_early:
                if chief:
                    log.info("early stop: no validation improvement in %d epochs", state.bad_epochs)
                break
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        del batches  # the loader's worker processes end here, not at interpreter exit

    output_dir = Path(config.output_dir)
    if interrupted:
        tracker.finish("KILLED")
        return TrainingResult(state, _unwrap(model), stopped_early, {"interrupted": True}, output_dir, None)
    report: dict[str, Any] = {}
    registered = None
    if chief:
        from fieldkube.trainer.finish import finish_run

        write_json_atomic(output_dir / "loss_curve.json", loss_curve)
        throughput = meter.summary()
        report, registered = finish_run(
            config,
            _unwrap(model),
            task,
            tile,
            test_set,
            state,
            tracker,
            device,
            init.weights if init is not None else None,
            {
                "world_size": backend.size,
                "backend": backend.name,
                "precision": precision.name,
                "global_batch": global_batch,
                "steps": state.global_step,
                "epochs": state.epoch,
                "seconds_this_run": round(time.perf_counter() - meter.started, 3),
                **throughput,
                "loader_cpu_ms_per_sample": 1e3 * loader_cpu_s / loader_samples if loader_samples else None,
                "train_gflops_per_image": flops_per_image / 1e9 if flops_per_image else None,
                "stopped_early": stopped_early,
                "run_id": state.run_id,
            },
        )
    tracker.finish("FINISHED")
    return TrainingResult(state, _unwrap(model), stopped_early, report, output_dir, registered)


def _log_progress(
    state: LoopState,
    epochs: int,
    spe: int,
    total_steps: int,
    loss: float,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    window: Window,
    elapsed: float,
) -> None:
    eta = elapsed / max(state.global_step, 1) * (total_steps - state.global_step)
    mfu = f", MFU {100 * window.mfu:.1f}%" if window.mfu is not None else ""
    log.info(
        "epoch %d/%d step %d/%d (global %d/%d, %.1f%%) loss %.5g lr %.3g | %.1f img/s%s, "
        "loader wait %.0f%% | ETA %s",
        state.epoch + 1,
        epochs,
        state.step_in_epoch,
        spe,
        state.global_step,
        total_steps,
        100.0 * state.global_step / total_steps,
        loss,
        scheduler.get_last_lr()[0],
        window.images_per_second,
        mfu,
        100 * window.loader_wait_share,
        _format_eta(eta),
    )


def _log_progress_metrics(
    tracker: Tracker,
    state: LoopState,
    total_steps: int,
    loss: float,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    window: Window,
) -> None:
    values = {
        TRAIN_LOSS: loss,
        IMAGES_PER_SECOND: window.images_per_second,
        "loader_wait_share": window.loader_wait_share,
        "lr": float(scheduler.get_last_lr()[0]),
        PROGRESS_EPOCH: state.epoch + 1,
        PROGRESS_STEP: state.global_step,
        PROGRESS_PERCENT: 100.0 * state.global_step / total_steps,
    }
    if window.mfu is not None:
        values["mfu"] = window.mfu
    tracker.log_metrics(values, step=state.global_step)
