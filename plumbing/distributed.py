"""Many processes, one run: what `torchrun --nproc_per_node N script.py ...` changes, kept out of
the method files. Without torchrun there is one process and no process group, and every
function here is a no-op.

Under torchrun:
- `setup()` joins the process group (NCCL on CUDA, gloo on the CPU) and pins each rank to its GPU;
- every batch is global: each rank draws the same global batch of data (the same seeded stream)
  and trains on its own slice of `1 / world` of it (`shard`), with its own noise (the global RNG
  is seeded per rank);
- the networks start equal (`broadcast`: rank 0's weights, as DistributedDataParallel does) and
  stay equal: `average_gradients` all-reduces every gradient before each optimiser step, which
  is what DDP's reducer does (without its overlap of communication and backward). It works for
  DMD's generator, which runs two forwards with gradient per backward (DDP's reducer needs
  `static_graph` for that), and keeps checkpoints free of DDP's `module.` prefix, so a
  checkpoint moves between 1 and N processes unchanged;
- evaluation samples are drawn in shares (`chunk`) and gathered (`gather`), so every rank holds
  all of them and computes the same metrics;
- rank 0 alone writes checkpoints, logs, metrics and pictures; the others wait where a file is
  written that they may read next (`save_checkpoint` and `write_json` end in a barrier), and a
  cache is looked up by every rank at once (`barrier` first), so that all take the same path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from plumbing.errors import UserError


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup() -> None:
    """Join the process group when started by torchrun (it sets WORLD_SIZE and LOCAL_RANK)."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def barrier() -> None:
    if active():
        dist.barrier()


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch (B, ...) -> (B / world, ...)."""
    n = world()
    if n == 1:
        return batch
    assert len(batch) % n == 0, f"a global batch of {len(batch)} does not split over {n} processes"
    size = len(batch) // n
    return batch[rank() * size:(rank() + 1) * size]


def check_batch(batch_size: int) -> None:
    """A one-line error when a global batch cannot be split evenly over the processes."""
    if batch_size % world():
        raise UserError(f"a batch of {batch_size} does not split over {world()} processes; pass a batch size "
                        f"that is a multiple of {world()} (batch sizes are global)")


def per_process(batch_size: int) -> int:
    """This process's share of a global batch size."""
    check_batch(batch_size)
    return batch_size // world()


def chunk(n: int) -> tuple[int, int]:
    """This rank's contiguous share [start, end) of n evaluation samples (the last ranks may get fewer)."""
    size = -(-n // world())
    return min(n, rank() * size), min(n, (rank() + 1) * size)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (its `chunk` of the samples, on the CPU), concatenated in rank order."""
    if not active():
        return x
    parts = [None] * world()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


def broadcast(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank."""
    if active():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce the gradients (one flat buffer) and divide by the world size."""
    if not active():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(values: dict) -> dict:
    """Numbers (floats or scalar tensors) averaged over the ranks; other values as they are."""
    if not active():
        return values
    keys = [k for k, v in values.items() if isinstance(v, float) or (isinstance(v, torch.Tensor) and v.numel() == 1)]
    if not keys:
        return values
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.tensor([float(values[k].detach()) if isinstance(values[k], torch.Tensor) else float(values[k])
                         for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return {**values, **{k: (flat[i] / world()).item() for i, k in enumerate(keys)}}
