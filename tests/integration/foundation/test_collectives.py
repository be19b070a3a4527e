"""The foundation is real: Horovod (through horovodrun with Gloo and through mpirun with MPI) and
torch.distributed (gloo) run as two separate processes and reduce values across them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("allreduce_worker.py")
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    # Loopback only: keep Gloo and OpenMPI off any other interface.
    env["HOROVOD_GLOO_IFACE"] = "lo"
    env["OMPI_MCA_btl_tcp_if_include"] = "lo"
    env["OMPI_MCA_oob_tcp_if_include"] = "lo"
    return env


def _run(cmd: list[str], out_dir: Path) -> list[dict]:
    proc = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return sorted(results, key=lambda r: r["rank"])


def _check_horovod(results: list[dict], controller: str) -> None:
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        assert res["size"] == 2
        assert res["sum"] == [3.0, 30.0]  # (1 + 2, 10 + 20)
        assert res["avg"] == [0.5]
        assert res["gathered"] == [0.0, 1.0]
        assert res["controller"] == controller


def test_horovodrun_gloo_allreduce_across_two_ranks(tmp_path: Path) -> None:
    horovodrun = BIN / "horovodrun"
    assert horovodrun.exists(), "horovodrun missing: run make dev"
    cmd = [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo"]
    results = _run([*cmd, sys.executable, str(WORKER), "horovod", str(tmp_path)], tmp_path)
    _check_horovod(results, "gloo")


def test_mpirun_mpi_allreduce_across_two_ranks(tmp_path: Path) -> None:
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun missing: run make dev (Debian openmpi-bin)"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none"]
    cmd += ["-x", "PATH", "-x", "OMP_NUM_THREADS", "-x", "HOROVOD_GLOO_IFACE"]
    results = _run([*cmd, sys.executable, str(WORKER), "horovod", str(tmp_path)], tmp_path)
    _check_horovod(results, "mpi")


def test_torch_distributed_gloo_all_reduce_across_two_ranks(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
    ]
    cmd += ["--master-port", str(_free_port())]
    results = _run([*cmd, str(WORKER), "ddp", str(tmp_path)], tmp_path)
    for rank, res in enumerate(results):
        assert res["size"] == 2
        assert res["local_rank"] == rank
        assert res["sum"] == [3.0, 30.0]
        assert res["gathered"] == [0.0, 1.0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
