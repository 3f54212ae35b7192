"""NCCL sanity check on a multi-GPU host, before the engine's tensor-parallel tests.

    python3 scripts/nccl_check.py [world_size] [abort]    (default: every GPU present)

One process per GPU, the same way the engine starts its workers (spawn, a TCP rendezvous, NVLink
multicast off) and through the same group object (nanovllm.utils.dist.TPGroup: its own store and
NCCL backend, no torch.distributed default group). Each rank checks, with a printed timing: an
all-reduce, a gather to rank 0 (the LM head's), an all-reduce of a MIN (the KV pool size), a
broadcast (run-ahead input ids), then an all-reduce and a gather captured in CUDA graphs on a
side stream and replayed; then frees the graphs and leaves the group (timed). A second group is
made beside the first and used in turn (two engines in one process). Every rank dumps its Python
stack after 60 s, so a hang shows where it waits. With `abort`, the last rank then leaves, and
rank 0 (waiting in an all-reduce) aborts the group as the engine does.
"""

import faulthandler
import os
import sys
import time
from datetime import timedelta

for key, value in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from nanovllm.engine.tp_workers import free_port  # noqa: E402
from nanovllm.utils.dist import TPGroup, create_group  # noqa: E402


def log(rank: int, start: float, what: str) -> None:
    print(f"[rank {rank} +{time.perf_counter() - start:6.2f}s] {what}", flush=True)


def check_abort(rank: int, start: float, group: TPGroup, graphs: list) -> None:
    """The last rank leaves; rank 0 is left waiting in an all-reduce, frees its graphs, aborts
    the group (as the engine does when a worker fails) and must get its GPU back."""
    import threading

    world = group.size
    if rank == world - 1:
        log(rank, start, "leaving without a word")
        os._exit(0)
    x = torch.ones(1 << 20, device="cuda")
    work = group.backend.allreduce([x])
    time.sleep(2.0)
    log(rank, start, f"all_reduce with a rank gone: completed={work.is_completed()}")
    for graph in graphs:
        graph.reset()
    t0 = time.perf_counter()
    finished = group.abort(timeout=20.0)
    log(rank, start, f"abort finished={finished} in {time.perf_counter() - t0:.2f} s")
    done = threading.Event()
    threading.Thread(target=lambda: (torch.cuda.synchronize(), done.set()), daemon=True).start()
    log(rank, start, f"device synchronized after the abort: {done.wait(20.0)}")
    if rank == 0 and done.is_set():
        fresh = create_group(
            f"tcp://127.0.0.1:{free_port()}", 0, 1, torch.device("cuda"), timedelta(seconds=30)
        )
        y = torch.ones(8, device="cuda")
        fresh.backend.allreduce([y]).wait()
        torch.cuda.synchronize()
        fresh.destroy()
        log(rank, start, "a new group works")
    faulthandler.cancel_dump_traceback_later()
    os._exit(0)


def rank_main(rank: int, world: int, methods: list[str], abort_test: bool = False) -> None:
    faulthandler.dump_traceback_later(60, exit=False)
    start = time.perf_counter()
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    group = create_group(methods[0], rank, world, device, timedelta(seconds=90))
    log(rank, start, "group up")
    x = torch.full((1024,), float(rank + 1), device="cuda")
    group.all_reduce(x)
    torch.cuda.synchronize()
    expected = world * (world + 1) / 2
    assert torch.all(x == expected), x[:4]
    log(rank, start, "all_reduce ok")
    y = torch.full((4, 8), float(rank), device="cuda")
    full = group.gather_last_dim(y)
    torch.cuda.synchronize()
    if rank == 0:
        assert all(torch.all(p == i) for i, p in enumerate(full.split(8, dim=-1)))
    log(rank, start, "gather ok")
    t = torch.tensor([100 + rank], device="cuda")
    assert int(group.all_reduce(t, op="min").item()) == 100
    log(rank, start, "all_reduce MIN ok")
    ids = torch.full((16,), rank + 7, device="cuda")
    group.broadcast(ids, src=0)
    assert torch.all(ids == 7)
    log(rank, start, "broadcast ok")
    # A second group beside the first (a second engine in the process), used in turn.
    other = create_group(methods[1], rank, world, device, timedelta(seconds=90))
    z = torch.full((64,), float(rank + 1), device="cuda")
    other.all_reduce(z)
    group.all_reduce(z)
    torch.cuda.synchronize()
    assert torch.all(z == expected * world), z[:4]
    log(rank, start, "two groups side by side ok")
    static = torch.zeros(4096, device="cuda")
    stream = torch.cuda.Stream()
    static.fill_(1.0)
    group.all_reduce(static)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static.mul_(2.0)
        group.all_reduce(static)
    log(rank, start, "graph captured")
    static.fill_(float(rank + 1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.all(static == 2 * expected), static[:4]
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2, stream=stream):
        gathered = group.gather_last_dim(y)
    y.fill_(float(rank + 10))
    graph2.replay()
    torch.cuda.synchronize()
    if rank == 0:
        parts = gathered.split(8, dim=-1)
        assert all(torch.all(p == i + 10) for i, p in enumerate(parts))
    log(rank, start, "graph replays ok (all_reduce, gather)")
    if abort_test:
        check_abort(rank, start, group, [graph, graph2])
        return
    # NCCL's shutdown waits while a graph that captured the communicator's collectives exists
    # (seen: a hang with the graphs alive), so the graphs go first, as in the engine.
    graph.reset()
    graph2.reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    other.destroy()
    group.destroy()
    log(rank, start, f"groups left in {time.perf_counter() - t0:.2f} s")
    assert not dist.is_initialized()
    faulthandler.cancel_dump_traceback_later()
    log(rank, start, "done")


if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else torch.cuda.device_count()
    abort_test = "abort" in sys.argv[2:]
    ports = [free_port()]
    while len(ports) < 2:  # two groups, two stores
        port = free_port()
        if port not in ports:
            ports.append(port)
    methods = [f"tcp://127.0.0.1:{port}" for port in ports]
    mp.spawn(rank_main, args=(world, methods, abort_test), nprocs=world)
    print(f"NCCL check {'(abort) ' if abort_test else ''}finished on {world} GPUs")
