"""Exact-resume checkpoints: model, optimizer, scheduler, RNG and data position, written atomically.

Only rank 0 writes. Files are `ckpt-<global step:09d>.pt` in the checkpoint directory, saved with
torch.save and read back with `weights_only=True` (tensors and plain containers only, no pickled
code). A file is written to a temporary name, fsynced and renamed, so a crash never leaves a partial
checkpoint under a real name; the newest complete file is the one resumed.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fieldkube.trainer.errors import DataError

log = logging.getLogger("fieldkube.checkpoint")
NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write `state` as the checkpoint of `step`, then keep only the newest `keep` files."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(root, step)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        old.unlink(missing_ok=True)
    return target


def load_latest(directory: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint's state (weights_only), or None when the directory holds none."""
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    try:
        state: dict[str, Any] = torch.load(latest, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: name it instead of a traceback
        raise DataError(
            f"{latest}: checkpoint cannot be read ({type(exc).__name__}: {exc}); remove it to "
            "resume from the previous one"
        ) from None
    loop = state.get("loop")
    step = loop.get("global_step") if isinstance(loop, dict) else None
    log.info("resuming from %s (step %s)", latest, step if step is not None else "unknown")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class CheckpointPolicy:
    """When rank 0 writes a checkpoint: every N steps, every N epochs, and when asked to stop (SIGTERM)."""

    every_steps: int | None
    every_epochs: int | None

    def after_step(self, global_step: int, stop_requested: bool) -> bool:
        return stop_requested or bool(self.every_steps and global_step % self.every_steps == 0)

    def after_epoch(self, epochs_done: int) -> bool:
        return bool(self.every_epochs and epochs_done % self.every_epochs == 0)
