"""fieldkube-profile allreduce under a real launcher (torchrun, 2 ranks, gloo): the gradient allreduce is
timed at each message size, and the predictor's alpha-beta fit on it prices a 2-worker iteration."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from fieldkube.trainer.profile_predict import fit_alpha_beta, read_allreduce


def test_two_ranks_time_the_allreduce_against_message_size(tmp_path: Path, env) -> None:
    from fieldkube.trainer.scale import free_port

    sizes = [4096, 262144, 4194304]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "fieldkube.trainer.profile", "allreduce", "--threads", "1",
           "--sizes", ",".join(map(str, sizes)), "--repeats", "5", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with (tmp_path / "allreduce.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({int(r["bytes"]) for r in rows}) == sizes
    assert {r["world_size"] for r in rows} == {"2"} and {r["backend"] for r in rows} == {"ddp"}
    assert len(rows) == 5 * len(sizes) and all(float(r["seconds"]) > 0 for r in rows)
    points = read_allreduce([tmp_path])
    assert [b for _, b, _ in points] == sizes
    model = fit_alpha_beta(points)
    assert model.beta_s_per_byte > 0  # moving 4 MB costs more than moving 4 kB (about 1000x the bytes)
    assert model.points == len(sizes) and model.world_sizes == [2]
    assert model.seconds(sizes[-1], 1) == 0.0  # one worker: no allreduce
