"""Run a function on N CPU processes joined by a gloo process group, as nnU-Net's DDP path joins its GPUs
(``nnunetv2.run.run_training.run_ddp``; nnU-Net itself asks for NCCL and CUDA, which this machine lacks)."""
import datetime
import faulthandler
import os
import traceback
from pathlib import Path
from typing import Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, folder: str, fn: Callable, args: tuple) -> None:
    # a native abort (gloo's threads) leaves here the Python stack where it happened
    faulthandler.enable(open(Path(folder, f"crash{rank}.txt"), "w"))
    # a collective one rank misses fails the test within a minute instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{folder}/process_group", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(folder, f"result{rank}.pt"))
    except BaseException:  # the parent shows it: a child's traceback would otherwise be lost in a hang
        Path(folder, f"error{rank}.txt").write_text(traceback.format_exc())
        dist.destroy_process_group()
        raise
    # no rank closes its connections while another still talks to it
    dist.barrier()
    dist.destroy_process_group()
    # the result is saved: leave without the interpreter's teardown of torch's native threads, the likely
    # place of a rare SIGABRT seen in CI ("terminate called without an active exception"; never in 100
    # runs here); should it come back, crash{rank}.txt shows where
    os._exit(0)


def run_ranks(fn: Callable, folder: Path, *args, world: int = 2) -> List:
    """``fn(rank, world, *args)`` on ``world`` processes (a top-level function, for pickling); returns
    each rank's result in rank order."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(_rank_main, args=(world, str(folder), fn, args), nprocs=world, join=True)
    except Exception as error:
        errors = "\n".join(p.read_text() for p in sorted(folder.glob("error*.txt")))
        crashes = "\n".join(p.read_text() for p in sorted(folder.glob("crash*.txt")))
        done = sorted(p.name for p in folder.glob("result*.pt"))
        raise AssertionError(f"a rank failed:\n{errors or error}\n{crashes}\nresults saved: {done}") from None
    return [torch.load(Path(folder, f"result{rank}.pt"), weights_only=False) for rank in range(world)]


def rows_of_rank(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s equal share of a global batch (dim 0)."""
    return tensor.chunk(world)[rank]
