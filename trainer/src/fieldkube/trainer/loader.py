"""Feed training from the prepared Parquet shards: global batch order, rank slices, seeded augmentation.

Data order is a property of the job, not of the rank count: every epoch has one seeded permutation cut
into global batches; rank r of W decodes only its contiguous slice of each global batch. Augmentation is
seeded per (seed, epoch, sample), so a 1-rank and a W-rank run see identical samples, and a resumed run
continues exactly where the checkpoint left off (epoch, step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from fieldkube.contract.config import DataConfig
from fieldkube.trainer.dataset_format import read_manifest
from fieldkube.trainer.errors import DataError

SampleKey = tuple[int, int]  # (epoch, sample index); epoch -1 means "no augmentation"


@dataclass(frozen=True)
class Augment:
    hflip: bool
    vflip: bool
    rot90: bool
    color_jitter: float

    @classmethod
    def from_config(cls, data: DataConfig) -> Augment:
        return cls(data.hflip, data.vflip, data.rot90, data.color_jitter)


def augment_pair(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator, augment: Augment
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the same flips/rotation to image (H, W, 3) uint8 and target (H, W); jitter the image colours."""
    if augment.hflip and rng.random() < 0.5:
        image, target = image[:, ::-1], target[:, ::-1]
    if augment.vflip and rng.random() < 0.5:
        image, target = image[::-1], target[::-1]
    if augment.rot90 and image.shape[0] == image.shape[1]:
        turns = int(rng.integers(0, 4))
        image, target = np.rot90(image, turns), np.rot90(target, turns)
    if augment.color_jitter > 0:
        strength = augment.color_jitter
        pixels = image.astype(np.float32)
        brightness, contrast, saturation = 1 + rng.uniform(-strength, strength, size=3)
        gray = pixels.mean(axis=2, keepdims=True)
        pixels = gray + (pixels - gray) * saturation
        pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
        image = np.clip(pixels * brightness, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


class PreparedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split of a prepared dataset. Items are keyed (epoch, index) -> (image (3,t,t), target (1,t,t)).

    Counter targets are density maps (sum = count x density_scale); segmenter targets are {0, 1} masks.
    Shards are memory-mapped lazily in each process (loader workers included).
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

    def record(self, index: int) -> dict[str, Any]:
        file_index, row = self.index[index]
        return self._table(file_index).slice(row, 1).to_pylist()[0]

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Decoded (image uint8 (t,t,3), target float32 (t,t) unscaled, record) of one sample."""
        from fieldkube.vision.imageio import read_image

        rec = self.record(index)
        image = read_image(rec["image"])
        if self.task == "counter":
            from fieldkube.vision.density import density_map_from_points

            points = np.asarray(rec["points"] or [], dtype=np.float64).reshape(-1, 2)
            target = density_map_from_points(points, image.shape[:2], sigma=self.sigma)
        else:
            target = (read_image(rec["mask"]).max(axis=2) > 127).astype(np.float32)
        return image, target, rec

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        from fieldkube.vision.normalize import to_tensor

        epoch, index = key
        image, target, _ = self.raw(index)
        if self.augment is not None and epoch >= 0:
            rng = np.random.default_rng([self.seed, epoch, index])
            image, target = augment_pair(image, target, rng, self.augment)
        if self.task == "counter":
            target = target * self.density_scale
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None]


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


def make_loader(
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
    batches: list[list[SampleKey]],
    workers: int,
    prefetch: int,
    pin_memory: bool = False,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """A torch DataLoader over explicit per-step batches, with worker processes prefetching ahead."""
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        options["prefetch_factor"] = prefetch
    return DataLoader(dataset, batch_sampler=batches, **options)
