"""fieldkube-profile on a tiny model: every layer is timed forward, backward and in the optimizer, the
CSVs agree with each other and with the measured iteration, and `parse` rebuilds the same summary."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

from fieldkube.trainer.profile import main
from fieldkube.trainer.profile_hooks import leaf_layers
from fieldkube.trainer.profile_report import ACCOUNT_ROWS, FUNCTION_KINDS, PHASES
from fieldkube.vision.models import build_model

TINY = ["--model", "counter-mcnn", "--tile", "32", "--batch", "2", "--iterations", "4", "--warmup", "1",
        "--threads", "1"]  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _summary(path: Path) -> dict[str, str]:
    return {row["key"]: row["value"] for row in _rows(path)}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile")
    main(["run", *TINY, "--repetitions", "2", "--out", str(out)])
    return out


def test_each_repetition_and_rank_gets_its_own_directory_with_csvs_and_plots(profiled: Path) -> None:
    for rep in ("rep-000", "rep-001"):
        directory = profiled / rep / "rank-0"
        for name in ("config.json", "layers.csv", "iterations.csv", "totals.csv", "summary.csv",
                     "layers.png", "iterations.png", "error.png"):  # fmt: skip
            assert (directory / name).is_file(), directory / name


def test_every_layer_has_forward_backward_and_optimizer_times(profiled: Path) -> None:
    all_rows = _rows(profiled / "rep-000" / "rank-0" / "layers.csv")
    rows = [r for r in all_rows if r["kind"] not in FUNCTION_KINDS]
    expected = {name for name, _ in leaf_layers(build_model("counter-mcnn"))}
    assert {r["layer"] for r in rows} == expected
    assert {int(r["iteration"]) for r in rows} == {0, 1, 2, 3}
    # MCNN concatenates its columns outside any module; the loss is arithmetic on tensors: both are rows
    functions = {
        r["layer"]: r for r in all_rows if r["kind"] in ("between", "loss") and r["iteration"] == "0"
    }
    assert float(functions["between:cat"]["forward_s"]) > 0 < float(functions["between:cat"]["backward_s"])
    assert any(name.startswith("loss:") and float(r["backward_s"]) > 0 for name, r in functions.items())
    for row in rows:
        assert float(row["forward_s"]) > 0, row
        assert float(row["backward_s"]) > 0, row  # conv, relu and transposed conv all have a grad node
        if row["kind"] in ("Conv2d", "ConvTranspose2d"):
            assert float(row["optimizer_s"]) > 0, row
        else:
            assert float(row["optimizer_s"]) == 0, row


def test_layer_sums_fit_inside_the_measured_phases_and_iteration(profiled: Path) -> None:
    directory = profiled / "rep-000" / "rank-0"
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for row in _rows(directory / "layers.csv"):
        if row["kind"] in FUNCTION_KINDS:
            continue
        acc = sums[int(row["iteration"])]
        for i, key in enumerate(("forward_s", "backward_s", "optimizer_s")):
            acc[i] += float(row[key])
    iterations = {int(r["iteration"]): r for r in _rows(directory / "iterations.csv")}
    totals = {int(r["iteration"]): r for r in _rows(directory / "totals.csv")}
    assert set(iterations) == set(totals) == set(sums)
    for it, (forward, backward, optimizer) in sums.items():
        phases = iterations[it]
        total = float(phases["iteration_s"])
        assert sum(float(phases[f"{p}_s"]) for p in PHASES) == pytest.approx(total, rel=1e-6)
        assert forward <= float(phases["forward_s"]) * 1.0001
        assert backward <= float(phases["backward_s"]) * 1.0001
        assert optimizer <= float(phases["optimizer_s"]) * 1.0001
        row = totals[it]
        assert float(row["layers_total_s"]) == pytest.approx(forward + backward + optimizer, rel=1e-6)
        coverage = float(row["coverage"])
        # the share the layers take is a timing (on a loaded machine a 32 px tile spends most of an
        # iteration in Python), so no floor: what is exact is that it is their sum over the iteration
        assert coverage == pytest.approx((forward + backward + optimizer) / total, rel=1e-6)
        assert 0 < coverage <= 1.0
        assert float(row["error_percent"]) == pytest.approx(100 * (1 - coverage), abs=1e-4)
        # the accounting rows (named rows and the gaps between timers) tile the iteration exactly
        assert sum(float(row[key]) for key in ACCOUNT_ROWS) == pytest.approx(total, rel=1e-6)
        assert float(row["accounted"]) >= coverage


def test_summary_has_config_total_time_and_the_quarter_marks(profiled: Path) -> None:
    summary = _summary(profiled / "rep-000" / "rank-0" / "summary.csv")
    assert summary["model"] == "counter-mcnn" and summary["batch"] == "2" and summary["world_size"] == "1"
    assert summary["profiling"] == "True"
    marks = [float(summary[f"time_at_{m}pct_s"]) for m in (25, 50, 75, 100)]
    assert marks == sorted(marks) and marks[-1] == pytest.approx(float(summary["total_s"]))
    assert float(summary["missing_at_100pct_s"]) >= 0
    assert 0 < float(summary["coverage_mean"]) <= 1


def test_parse_rebuilds_summaries_from_the_csvs(profiled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary_path = profiled / "rep-001" / "rank-0" / "summary.csv"
    before = summary_path.read_text()
    summary_path.unlink()
    main(["parse", str(profiled), "--no-plots"])
    assert summary_path.read_text() == before
    overview = _rows(profiled / "overview.csv")
    assert [r["directory"] for r in overview] == ["rep-000/rank-0", "rep-001/rank-0"]
    assert "layers cover" in capsys.readouterr().out


def test_profiling_off_records_iterations_only(tmp_path: Path) -> None:
    main(["run", *TINY, "--no-profiling", "--out", str(tmp_path)])
    directory = tmp_path / "rep-000" / "rank-0"
    assert not (directory / "layers.csv").exists()
    summary = _summary(directory / "summary.csv")
    assert summary["profiling"] == "False" and "coverage_mean" not in summary
    assert len(_rows(directory / "iterations.csv")) == 4


def test_bad_model_and_missing_profile_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", "counter-resnet", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "counter-resnet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["parse", str(tmp_path / "nothing")])
    assert "nothing: directory not found" in capsys.readouterr().err


def test_profiling_does_not_change_what_is_trained() -> None:
    """Per-layer optimizers and hooks give the same weights as one optimizer without hooks."""
    import torch

    from fieldkube.trainer.backends import SingleBackend
    from fieldkube.trainer.launch_env import LaunchEnv
    from fieldkube.trainer.profile import IterationRunner, ProfileSettings

    backend = SingleBackend(LaunchEnv("single", 0, 0, 1))
    runs = []
    for profiling in (False, True):
        settings = ProfileSettings(tile=24, batch=2, iterations=3, warmup=0, profiling=profiling, lr=1e-2)
        runner = IterationRunner(settings, backend, torch.device("cpu"))
        runner.run(settings.iterations, settings.warmup)
        runner.close()
        runs.append(runner.model.state_dict())
    plain, profiled = runs
    for name, tensor in plain.items():
        torch.testing.assert_close(profiled[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
