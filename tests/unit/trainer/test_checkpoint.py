"""Checkpoints are written atomically, pruned, and read back without unpickling code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fieldkube.trainer.checkpoint import list_checkpoints, load_latest, save_checkpoint
from fieldkube.trainer.errors import DataError


def test_latest_checkpoint_round_trips_and_old_ones_are_pruned(tmp_path: Path) -> None:
    for step in (3, 6, 9):
        save_checkpoint(
            tmp_path, step, {"weights": torch.full((2,), float(step)), "loop": {"step": step}}, keep=2
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000006.pt", "ckpt-000000009.pt"]
    state = load_latest(tmp_path)
    assert state is not None
    assert state["loop"] == {"step": 9}
    assert torch.equal(state["weights"], torch.full((2,), 9.0))
    assert not list(tmp_path.glob(".*.tmp"))


def test_empty_or_missing_directory_means_a_fresh_start(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "absent") is None
    (tmp_path / ".ckpt-abc.tmp").write_bytes(b"half written")  # a crash mid-write is ignored
    assert load_latest(tmp_path) is None


def test_a_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "ckpt-000000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"ckpt-000000001\.pt: checkpoint cannot be read"):
        load_latest(tmp_path)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    import argparse

    torch.save({"obj": argparse.Namespace(payload=1)}, tmp_path / "ckpt-000000002.pt")
    with pytest.raises(DataError, match="cannot be read"):
        load_latest(tmp_path)
