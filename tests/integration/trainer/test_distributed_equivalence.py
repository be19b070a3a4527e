"""The allreduce path is correct: 2 Horovod ranks and 2 DDP ranks end with the weights of 1 rank
that sees the same global batches in the same order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model" / "model.safetensors"))


def _train(train_cli, launcher: str, data: Path, out: Path, fast_args: list[str]) -> dict[str, torch.Tensor]:
    args = ["--data", str(data), "--set", "train.epochs=2", "--set", f"output_dir={out}", *fast_args]
    proc = train_cli(launcher, args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = "1 cpu rank(s) [single]" if launcher == "single" else f"2 cpu rank(s) [{launcher}]"
    assert ranks in proc.stdout + proc.stderr
    return _weights(out)


@pytest.fixture(scope="module")
def single_rank_weights(
    field_dataset: Path, tmp_path_factory, train_cli, fast_args
) -> dict[str, torch.Tensor]:
    return _train(train_cli, "single", field_dataset, tmp_path_factory.mktemp("single"), fast_args)


@pytest.mark.parametrize("launcher", ["horovod", "ddp"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(
    launcher: str, field_dataset: Path, tmp_path: Path, single_rank_weights, train_cli, fast_args
) -> None:
    from fieldkube.vision.models import build_model

    weights = _train(train_cli, launcher, field_dataset, tmp_path, fast_args)
    torch.manual_seed(0)
    initial = build_model("counter-mcnn").state_dict()
    assert weights.keys() == single_rank_weights.keys() == initial.keys()
    assert max(float((weights[k] - initial[k]).abs().max()) for k in initial) > 1e-5  # training moved them
    for name, reference in single_rank_weights.items():
        torch.testing.assert_close(weights[name], reference, rtol=1e-5, atol=1e-6, msg=name)
