"""Where a run executes: the device (cuda, then mps, then cpu), the precision that pays on it, and the
processes torchrun starts (DDP only when RANK is set, as nanoGPT). Shared by train.py, bench.py and
eval_linear.py.
"""

import os

import torch
import torch.distributed as dist


# ---- collectives: every one goes through here, on its backend's device ----
# NCCL takes only CUDA tensors and gloo (the CPU backend) CPU ones, whatever device a value was computed on.


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def backend_device() -> torch.device:
    """The device a collective's tensors must be on: this process's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """t reduced over every rank (in place, and returned), wherever t lives; t itself with one process."""
    if world_size() == 1:
        return t
    on_backend = t.to(backend_device())
    dist.all_reduce(on_backend, op=op)
    if on_backend is not t:
        t.copy_(on_backend)
    return t


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's t (the same shape on each), on t's device, in rank order."""
    if world_size() == 1:
        return [t]
    on_backend = t.to(backend_device())
    parts = [torch.empty_like(on_backend) for _ in range(world_size())]
    dist.all_gather(parts, on_backend)
    return [p.to(device=t.device, dtype=t.dtype) for p in parts]


def setup_distributed(args):
    """DDP only when torchrun set RANK; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return rank, world, local_rank


def pick_device(requested: str | None) -> str:
    if requested:
        if requested == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_bf16_units() -> dict[str, bool]:
    """This CPU's bf16 matrix instructions: AMX tiles (`amx_tile`) and AVX-512 BF16 (`avx512_bf16`)."""
    def probe(name):
        return bool(getattr(torch.cpu, name, lambda: False)())
    return {"amx": probe("_is_amx_tile_supported"), "avx512_bf16": probe("_is_avx512_bf16_supported")}


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix products outrun fp32 ones on this CPU, on 2 cores: with AMX the training step runs 2.2x
    faster in bf16 (Intel Xeon, docs/performance.md); with AVX-512 BF16 and no AMX a 1024^3 matmul 2.5x (AMD EPYC:
    346 against 140 GFLOP/s) and the cifar10-cpu step 1.8x; on AVX-512 alone bf16 is slower (a matmul at 30 against
    190 GFLOP/s, the step at 3.4 against 12.3 img/s)."""
    return any(cpu_bf16_units().values())


def pick_precision(requested: str | None, device: str) -> str:
    if requested:
        if requested == "fp16" and device == "cpu":
            raise ValueError("fp16 needs a GPU; use bf16 or fp32 on CPU")
        return requested
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device == "cpu" and cpu_has_fast_bf16() else "fp32"


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)
