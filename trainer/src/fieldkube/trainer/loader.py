"""Feed training from the prepared Parquet shards: global batch order, rank slices, seeded augmentation.

Data order is a property of the job, not of the rank count: every epoch has one seeded permutation cut
into global batches; rank r of W decodes only its contiguous slice of each global batch. Augmentation is
seeded per (seed, epoch, sample), so a 1-rank and a W-rank run see identical samples, and a resumed run
continues exactly where the checkpoint left off (epoch, step).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from fieldkube.contract.config import DataConfig
from fieldkube.trainer.augment import Augment, RawBatch, draw_params, finish_batch
from fieldkube.trainer.dataset_format import MANIFEST, decode_mask, decode_tile, pixels_of, read_manifest
from fieldkube.trainer.errors import DataError
from fieldkube.vision.density import density_map_from_points

SampleKey = tuple[int, int]  # (epoch, sample index); epoch -1 means "no augmentation"


class PreparedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split of a prepared dataset, read a whole batch at a time.

    ``dataset.__getitems__(keys)`` (what torch's DataLoader calls for a batch) takes the batch's rows
    from the memory-mapped shards in one Arrow ``take`` per shard, decodes the tiles and returns a
    :class:`RawBatch` (uint8 pixels, points or masks, each sample's augmentation); ``finish`` turns
    one into model inputs and targets on any device (`fieldkube.trainer.augment`). Counter targets are
    density maps (sum = count x density_scale); segmenter targets are {0, 1} masks. Shards are mapped
    lazily in each process (loader workers included).
    """

    def __init__(self, root: str | Path, split: str, data: DataConfig, seed: int, augment: bool) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise DataError(
                f"{self.root}/manifest.json: no split {split!r} (has {', '.join(self.manifest['splits'])})"
            )
        self.task: str = self.manifest["task"]
        self.tile: int = int(self.manifest["tile"])
        self.pixels = pixels_of(self.manifest, self.root / MANIFEST)
        self.sigma = data.sigma
        self.density_scale = data.density_scale
        self.seed = seed
        self.augment = Augment.from_config(data) if augment else None
        info = self.manifest["splits"][split]
        self.files: list[str] = list(info["files"])
        selection: dict[str, list[int]] | None = info.get("selection")
        self.index: list[tuple[int, int]] = []
        for file_index, name in enumerate(self.files):
            path = self.root / name
            if not path.is_file():
                raise DataError(f"{path}: shard listed in manifest.json is missing")
            rows = selection[name] if selection is not None else range(pq.read_metadata(path).num_rows)
            self.index.extend((file_index, int(row)) for row in rows)
        self._tables: dict[int, pa.Table] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _table(self, file_index: int) -> pa.Table:
        if file_index not in self._tables:
            path = self.root / self.files[file_index]
            try:
                self._tables[file_index] = pq.read_table(path, memory_map=True)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{path}: not a readable Parquet shard ({exc})") from None
        return self._tables[file_index]

    def _rows(self, indices: list[int], columns: list[str]) -> dict[str, Any]:
        """``columns`` of the samples ``indices``, in that order: one Arrow ``take`` per shard touched."""
        by_file: dict[int, list[int]] = {}
        for position, index in enumerate(indices):
            by_file.setdefault(self.index[index][0], []).append(position)
        parts, order = [], []
        for file_index, positions in by_file.items():
            rows = pa.array([self.index[indices[p]][1] for p in positions], type=pa.int64())
            parts.append(self._table(file_index).select(columns).take(rows))
            order.extend(positions)
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if order != sorted(order):
            table = table.take(pa.array(np.argsort(order), type=pa.int64()))
        return {name: table.column(name).combine_chunks() for name in columns}

    def record(self, index: int) -> dict[str, Any]:
        file_index, row = self.index[index]
        return self._table(file_index).slice(row, 1).to_pylist()[0]

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Decoded (image uint8 (t,t,3), target float32 (t,t) unscaled, record) of one sample, as stored."""
        rec = self.record(index)
        image = decode_tile(rec["image"], self.pixels, self.tile)
        if self.task == "counter":
            points = np.asarray(rec["points"] or [], dtype=np.float64).reshape(-1, 2)
            target = density_map_from_points(points, image.shape[:2], sigma=self.sigma)
        else:
            target = decode_mask(rec["mask"], self.pixels, self.tile).astype(np.float32)
        return image, target, rec

    def __getitems__(self, keys: list[SampleKey]) -> RawBatch:
        """The raw batch of ``keys``: what a loader worker does (read, decode, draw the augmentation)."""
        began = time.process_time()
        indices = [index for _, index in keys]
        columns = ["image", "points"] if self.task == "counter" else ["image", "mask"]
        rows = self._rows(indices, columns)
        images = np.stack([decode_tile(v, self.pixels, self.tile) for v in rows["image"].to_pylist()])
        square = images.shape[1] == images.shape[2]
        params = np.stack(
            [draw_params(self.seed, epoch, index, self.augment, square) for epoch, index in keys]
        )
        masks = None
        points = torch.zeros((0, 3), dtype=torch.float32)
        if self.task == "counter":
            lists = rows["points"]
            offsets = lists.offsets.to_numpy()
            counts = np.diff(offsets) // 2
            flat = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
            sample = np.repeat(np.arange(len(keys), dtype=np.float32), counts)
            points = torch.from_numpy(np.column_stack([sample, flat.reshape(-1, 2)]).astype(np.float32))
        else:
            decoded = [decode_mask(v, self.pixels, self.tile) for v in rows["mask"].to_pylist()]
            masks = torch.from_numpy(np.stack(decoded))
        spent = time.process_time() - began
        return RawBatch.build(torch.from_numpy(images), params, points, masks, loader_cpu_s=spent)

    def finish(self, raw: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs and targets of a raw batch, on the raw batch's device."""
        return finish_batch(raw, self.task, self.sigma, self.density_scale)

    def batch(self, keys: list[SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, 3, t, t) and targets (B, 1, t, t) of ``keys``, finished on the CPU."""
        return self.finish(self.__getitems__(keys))

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.batch([key])
        return inputs[0], targets[0]


def steps_per_epoch(size: int, global_batch: int) -> int:
    return size // global_batch


def epoch_batches(
    size: int, global_batch: int, rank: int, world: int, seed: int, epoch: int, start_step: int = 0
) -> list[list[SampleKey]]:
    """This rank's slice of every remaining global batch of `epoch` (last partial batch dropped)."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}")
    local = global_batch // world
    order = np.random.default_rng([seed, epoch, 65537]).permutation(size)
    batches = []
    for step in range(start_step, steps_per_epoch(size, global_batch)):
        chunk = order[step * global_batch : (step + 1) * global_batch]
        batches.append([(epoch, int(i)) for i in chunk[rank * local : (rank + 1) * local]])
    return batches


@dataclass(frozen=True)
class BatchPlan:
    """This rank's batches from (epoch, step) onwards, across epochs, up to ``total_steps`` global steps.

    One DataLoader iterates a whole run's plan, so its worker processes start once and keep prefetching
    across epoch boundaries (and during validation) instead of being created anew every epoch.
    """

    size: int
    global_batch: int
    rank: int
    world: int
    seed: int
    epochs: int
    total_steps: int
    epoch: int = 0
    step_in_epoch: int = 0

    def __iter__(self) -> Iterator[list[SampleKey]]:
        spe = steps_per_epoch(self.size, self.global_batch)
        done = self.epoch * spe + self.step_in_epoch
        epoch, start = self.epoch, self.step_in_epoch
        while epoch < self.epochs and done < self.total_steps:
            batches = epoch_batches(
                self.size, self.global_batch, self.rank, self.world, self.seed, epoch, start
            )
            for keys in batches[: self.total_steps - done]:
                done += 1
                yield keys
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        spe = steps_per_epoch(self.size, self.global_batch)
        done = self.epoch * spe + self.step_in_epoch
        return max(0, min(self.epochs * spe, self.total_steps) - done)


class LoadedBatch(NamedTuple):
    """A finished batch from the loader, with the CPU seconds its worker spent on it."""

    inputs: torch.Tensor
    targets: torch.Tensor
    loader_cpu_s: float


class _FinishOnCpu:
    """The loader's collate step when training on the CPU: workers hand over finished batches."""

    def __init__(self, dataset: PreparedDataset) -> None:
        self.dataset = dataset

    def __call__(self, raw: RawBatch) -> LoadedBatch:
        began = time.process_time()
        inputs, targets = self.dataset.finish(raw)
        return LoadedBatch(inputs, targets, raw.loader_cpu_s + time.process_time() - began)


def _as_is(batch: Any) -> Any:
    return batch


def make_loader(
    dataset: Dataset[Any],
    batches: Iterable[list[SampleKey]],
    workers: int,
    prefetch: int,
    device: torch.device | None = None,
) -> DataLoader[Any]:
    """A torch DataLoader over explicit per-step batches, with worker processes prefetching ahead.

    For a prepared dataset on a GPU it yields :class:`RawBatch` (pinned, to be moved and finished on
    the device: ``dataset.finish(raw.to(device))``), on a CPU a :class:`LoadedBatch`; a user dataset's
    batches are torch's default collation of its (input, target) items.
    """
    on_gpu = device is not None and device.type == "cuda"
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": on_gpu}
    if workers > 0:
        options["prefetch_factor"] = prefetch
    if isinstance(dataset, PreparedDataset):
        options["collate_fn"] = _as_is if on_gpu else _FinishOnCpu(dataset)
    return DataLoader(dataset, batch_sampler=batches, **options)
