"""The cost of one MoE layer's exchange between MPI ranks on this machine: the allreduce of a hidden state
(DeepSeek-R1's 7168 floats: one decoded token's partial outputs) and the broadcast of the layer's input,
as refengine.distributed does them (non-blocking, polled) and as plain blocking MPI calls.

    .venv/bin/mpiexec -np 2 .venv/bin/python scripts/bench_allreduce.py
    .venv/bin/mpiexec -np 2 .venv/bin/python scripts/bench_allreduce.py --floats 7168,57344 --json

Rank 0 prints, for each size, the median and the best time of a call over --calls calls (after --warmup),
each figure the time between a barrier and the call's completion on rank 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

from refengine.distributed import World


def timed(world: World, call, calls: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + calls):
        world.comm.Barrier()
        start = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floats", default="7168", help="comma-separated vector lengths (float32)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    world = World(comm, comm.Get_rank(), comm.Get_size())
    rows = []
    for n in (int(f) for f in args.floats.split(",")):
        x = np.full(n, world.rank + 1, dtype=np.float32)
        total = np.empty_like(x)
        cases = {
            "allreduce, polled (refengine)": lambda x=x: world.allreduce(x),
            "allreduce, blocking": lambda x=x, total=total: comm.Allreduce(x, total, op=MPI.SUM),
            "broadcast, polled (refengine)": lambda x=x: world.bcast(x),
        }
        for name, call in cases.items():
            times = timed(world, call, args.calls, args.warmup)
            rows.append(
                {
                    "op": name,
                    "floats": n,
                    "bytes": 4 * n,
                    "median_us": statistics.median(times) * 1e6,
                    "best_us": min(times) * 1e6,
                }
            )
    if world.rank == 0:
        if args.json:
            print(json.dumps({"ranks": world.size, "mpi": MPI.Get_library_version().splitlines()[0], "rows": rows}))
        else:
            print(f"{world.size} ranks, {MPI.Get_library_version().splitlines()[0].strip()}")
            for r in rows:
                print(
                    f"{r['op']:<32} {r['floats']:>8} floats  "
                    f"median {r['median_us']:8.1f} us  best {r['best_us']:8.1f} us"
                )


if __name__ == "__main__":
    main()
