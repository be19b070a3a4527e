"""The repository layout keeps its promises: one `fieldkube` namespace over five distributions, an operator
and a contract that never pull in torch, and no directory that shadows a standard-library module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DISTRIBUTIONS = ("contract", "vision", "trainer", "serving", "operator")


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_fieldkube_is_a_namespace_package_shared_by_five_distributions() -> None:
    """The five product distributions, plus the development-only local cluster (hack/localcluster)."""
    for dist in DISTRIBUTIONS:
        assert (ROOT / dist / "src" / "fieldkube" / dist).is_dir(), dist
        assert not (ROOT / dist / "src" / "fieldkube" / "__init__.py").exists(), (
            f"{dist} breaks the namespace"
        )
    assert not (ROOT / "hack" / "localcluster" / "src" / "fieldkube" / "__init__.py").exists()
    proc = _python("import fieldkube, json; print(json.dumps(sorted(fieldkube.__path__)))")
    assert proc.returncode == 0, proc.stderr
    paths = {Path(p).resolve() for p in json.loads(proc.stdout)}
    expected = {(ROOT / d / "src" / "fieldkube").resolve() for d in DISTRIBUTIONS}
    assert paths == expected | {(ROOT / "hack" / "localcluster" / "src" / "fieldkube").resolve()}, paths


def _imports_none_of(package: str, forbidden: set[str]) -> None:
    """Import every module of ``package`` in a fresh interpreter; none of ``forbidden`` may come along."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package} as pkg\n"
        f"mods = [m.name for m in pkgutil.walk_packages(pkg.__path__, '{package}.')]\n"
        f"assert mods, '{package} has no modules'\n"
        "for name in mods:\n"
        "    importlib.import_module(name)\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(forbidden)!r}))\n"
        "print(len(mods), heavy)\n"
        "assert not heavy, heavy\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_importing_the_operator_does_not_import_torch() -> None:
    _imports_none_of("fieldkube.operator", {"torch", "torchvision", "horovod"})


def test_the_contract_imports_neither_torch_nor_the_kubernetes_client() -> None:
    """Both sides import it: the trainer image has no Kubernetes client, the operator image no torch."""
    _imports_none_of("fieldkube.contract", {"torch", "torchvision", "kubernetes", "kopf", "mlflow"})


def test_operator_directory_does_not_shadow_the_standard_library() -> None:
    proc = _python("import operator; print(operator.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert "site-packages" not in proc.stdout
    assert str(ROOT / "operator") not in proc.stdout
    assert Path(proc.stdout.strip()).name == "operator.py"
