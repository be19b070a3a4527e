"""BK.Synapse-style user code: a model with loss()/metrics() and a dataset, imported from a mounted
directory by 'pkg.module:Class' (importlib, no exec), trains through the same CLI."""

from __future__ import annotations

import json
from pathlib import Path

USER_MODULE = """
import torch
from torch import nn
from torch.utils.data import Dataset


class TinyRegressor(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, x):
        return self.body(x)

    def loss(self, output, target):
        return ((output - target) ** 2).mean()

    def metrics(self, output, target):
        return {"mean_abs_error": float((output - target).abs().mean())}


class BrightnessMaps(Dataset):
    def __init__(self, root: str, split: str) -> None:
        self.size = 16 if split == "train" else 8
        self.offset = 0 if split == "train" else 1000

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.offset + index)
        x = torch.rand(3, 8, 8, generator=g)
        return x, x.mean(dim=0, keepdim=True)
"""


def test_user_model_and_dataset_train_from_a_mounted_directory(tmp_path: Path, train_cli, fast_args) -> None:
    code = tmp_path / "mounted" / "userpkg"
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "nets.py").write_text(USER_MODULE)
    out = tmp_path / "out"
    args = [
        "--model", "userpkg.nets:TinyRegressor", "--dataset", "userpkg.nets:BrightnessMaps",
        "--set", f"model.user_code_dir={tmp_path / 'mounted'}", "--set", "model.params={width: 6}",
        "--data", str(tmp_path), "--set", "train.epochs=3", "--set", "train.lr=0.01",
        "--set", f"output_dir={out}", *fast_args,
    ]  # fmt: skip
    proc = train_cli("single", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_mean_abs_error" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "custom"
    assert (out / "model" / "model.safetensors").is_file()
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["name"] == "userpkg.nets:TinyRegressor" and spec["params"] == {"width": 6}
    history = spec["trained"]["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # it learned something


def test_user_code_that_fails_to_import_is_reported_in_one_line(tmp_path: Path, train_cli) -> None:
    code = tmp_path / "broken"
    code.mkdir()
    (code / "badnet.py").write_text("import not_installed_anywhere\n")
    proc = train_cli("single", ["--model", "badnet:Net", "--set", f"model.user_code_dir={code}",
                                "--data", str(tmp_path), "--set", "metrics.port=0"])  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.name 'badnet:Net': cannot import badnet (ModuleNotFoundError" in proc.stderr
