"""A 2-rank collective used by the foundation tests: each rank contributes known values and writes what
the collective returned, so the test can check the reduction really happened across processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def horovod_main(out_dir: Path) -> None:
    import horovod.torch as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    summed = hvd.allreduce(torch.tensor([rank + 1.0, 10.0 * (rank + 1)]), op=hvd.Sum, name="sum")
    averaged = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Average, name="avg")
    gathered = hvd.allgather(torch.tensor([[float(rank)]]), name="gather")
    result = {
        "rank": rank,
        "size": size,
        "sum": summed.tolist(),
        "avg": averaged.tolist(),
        "gathered": gathered.flatten().tolist(),
        "controller": "mpi" if hvd.mpi_enabled() else "gloo",
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    hvd.shutdown()


def ddp_main(out_dir: Path) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    summed = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    gathered = [torch.zeros(1) for _ in range(size)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    result = {
        "rank": rank,
        "size": size,
        "sum": summed.tolist(),
        "gathered": [float(t.item()) for t in gathered],
        "local_rank": int(os.environ["LOCAL_RANK"]),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    {"horovod": horovod_main, "ddp": ddp_main}[mode](out)
