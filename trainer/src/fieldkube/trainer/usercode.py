"""Load a user's model or dataset class (BK.Synapse style) from a mounted directory via importlib, never exec.

A user model is an `nn.Module` subclass with `loss(output, target) -> Tensor` and optionally
`metrics(output, target) -> dict[str, float]`; it is constructed with `model.params` as keyword
arguments. A user dataset is a `torch.utils.data.Dataset` constructed as `Class(path, split)` whose items
are (input (3, H, W) float tensor, target tensor).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from fieldkube.trainer.errors import UserCodeError


def import_class(spec: str, code_dir: str | None, field: str) -> type:
    """'pkg.module:Class' -> the class, importing from `code_dir` first; errors name the config field."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise UserCodeError(f"{field} {spec!r}: expected 'pkg.module:Class'")
    if code_dir is not None:
        root = Path(code_dir)
        if not root.is_dir():
            raise UserCodeError(f"model.user_code_dir {code_dir!r}: directory not found")
        if str(root.resolve()) not in sys.path:
            sys.path.insert(0, str(root.resolve()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module failed to import: report its error in one line
        raise UserCodeError(
            f"{field} {spec!r}: cannot import {module_name} ({type(exc).__name__}: {exc})"
        ) from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserCodeError(f"{field} {spec!r}: module {module_name} has no class {class_name}")
    return cls


def load_user_model(spec: str, code_dir: str | None, params: dict[str, Any]) -> nn.Module:
    cls = import_class(spec, code_dir, "model.name")
    if not issubclass(cls, nn.Module):
        raise UserCodeError(f"model.name {spec!r}: {cls.__name__} is not a torch.nn.Module")
    if not callable(getattr(cls, "loss", None)):
        raise UserCodeError(f"model.name {spec!r}: {cls.__name__} has no loss(output, target) method")
    try:
        return cls(**params)
    except TypeError as exc:
        raise UserCodeError(f"model.params for {spec!r}: {exc}") from None


def load_user_dataset(spec: str, code_dir: str | None, path: str, split: str) -> Dataset[Any]:
    cls = import_class(spec, code_dir, "data.dataset")
    try:
        dataset = cls(path, split)
    except Exception as exc:
        raise UserCodeError(
            f"data.dataset {spec!r} with split {split!r}: {type(exc).__name__}: {exc}"
        ) from None
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise UserCodeError(f"data.dataset {spec!r}: {cls.__name__} needs __getitem__ and __len__")
    return dataset
