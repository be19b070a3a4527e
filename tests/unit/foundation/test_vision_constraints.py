"""images/vision-constraints.txt, all the images' shared vision-deps stage copies, is current
(hack/vision_constraints.py), and the stage copies it rather than the whole constraints.txt, so that a pin
outside fieldkube-vision's dependency closure does not rebuild the two images' torch layer."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "hack" / "vision_constraints.py"
DOCKERFILES = (ROOT / "images/serving/Dockerfile", ROOT / "images/trainer/Dockerfile")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vision_constraints", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vc = _load()


@pytest.fixture(scope="module")
def generated() -> str:
    return vc.render(vc.CONSTRAINTS.read_text(), vc.dependency_closure())


def test_the_committed_file_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_closure_is_visions_and_not_servings(generated: str) -> None:
    closure = vc.dependency_closure()
    assert {"torch", "numpy", "scipy", "pillow", "imagecodecs", "safetensors", "scikit-image"} <= closure
    assert not {"fastapi", "uvicorn", "httptools", "uvloop", "mlflow-skinny", "horovod"} & closure
    pins = [line for line in generated.splitlines() if not line.startswith("#")]
    assert len(pins) == len(closure) - 1  # all but fieldkube-vision itself
    assert any(line.startswith("torch==") for line in pins)


def test_the_pins_are_constraints_lines_in_their_order(generated: str) -> None:
    lines = vc.CONSTRAINTS.read_text().splitlines()
    pins = [line for line in generated.splitlines() if not line.startswith("#")]
    positions = [lines.index(line) for line in pins]
    assert positions == sorted(positions)


@pytest.mark.parametrize("edit", ["changed pin", "missing pin", "extra pin", "missing file"])
def test_a_stale_file_is_detected(tmp_path: Path, generated: str, edit: str) -> None:
    path = tmp_path / "vision-constraints.txt"
    torch_pin = next(line for line in generated.splitlines() if line.startswith("torch=="))
    if edit == "changed pin":
        path.write_text(generated.replace(torch_pin, "torch==0.0.1"))
    elif edit == "missing pin":
        path.write_text(generated.replace(f"{torch_pin}\n", ""))
    elif edit == "extra pin":
        path.write_text(generated + "uvicorn==0.1\n")
    assert vc.stale_message(path, generated) is not None
    if edit != "missing file":
        path.write_text(generated)
        assert vc.stale_message(path, generated) is None


def test_check_fails_naming_the_file_and_make_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "vision-constraints.txt"
    stale.write_text(vc.HEADER + "torch==0.0.1\n")
    monkeypatch.setattr(vc, "OUTPUT", stale)
    assert vc.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "vision-constraints.txt" in err and "make lock" in err


def test_a_closure_member_without_a_pin_fails_clearly() -> None:
    with pytest.raises(vc.VisionConstraintsError, match=r"not-pinned-here.*make lock"):
        vc.render("numpy==2.0.0\n", {"fieldkube-vision", "numpy", "Not_Pinned.Here"})


def test_names_are_matched_canonically() -> None:
    text = "# header\nPillow==11.0.0\ntyping_extensions==4.0\nuvicorn==0.1\n"
    rendered = vc.render(text, {"fieldkube-vision", "pillow", "typing-extensions"})
    assert rendered == vc.HEADER + "Pillow==11.0.0\ntyping_extensions==4.0\n"


def _stage(dockerfile: Path) -> list[str]:
    """The vision-deps stage without comments, as hack/build-images.sh's check_shared_stage reads it."""
    lines, on = [], False
    for line in dockerfile.read_text().splitlines():
        if re.match(r"FROM .* AS vision-deps", line):
            on = True
        elif on and line.startswith("FROM "):
            break
        if on and not line.startswith("#"):
            lines.append(line)
    return lines


def test_the_vision_deps_stage_is_shared_and_copies_only_visions_pins() -> None:
    serving, trainer = (_stage(path) for path in DOCKERFILES)
    assert serving and serving == trainer
    copies = [line.split()[1] for line in serving if line.startswith("COPY ")]
    assert copies == ["images/vision-constraints.txt", "vision/pyproject.toml"]
    assert not any("/opt/fieldkube/constraints.txt" in line for line in serving)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_full_constraints_are_copied_before_each_use(dockerfile: Path) -> None:
    """Every stage that uses /opt/fieldkube/constraints.txt (or runs hack/build-horovod.sh, which reads
    constraints.txt from its working directory) copies it first."""
    copied, uses = False, 0
    for line in dockerfile.read_text().splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("FROM "):
            copied = False  # a new stage: its parent, vision-deps, has no constraints.txt
        elif line.startswith("COPY "):
            copied = copied or line.startswith("COPY constraints.txt /opt/fieldkube/constraints.txt")
        elif "/opt/fieldkube/constraints.txt" in line or "hack/build-horovod.sh" in line:
            assert copied, f"{dockerfile.relative_to(ROOT)}: uses constraints.txt before copying it: {line}"
            uses += 1
    assert uses
