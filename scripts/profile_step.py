"""Where one training step spends its time: `python scripts/profile_step.py [train.py flags]`.

Runs `train.py --benchmark 5` with the given flags and wraps its sixth step (after the warm-up ones) in
torch.profiler, then prints the operators by self time. For example, the issue's CPU shape:

    python scripts/profile_step.py --dataset synthetic --arch vit_tiny --patch-size 4 --global-size 32 \
        --local-size 16 --local-crops 6 --batch-size 64 --out-dim 4096 --device cpu
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402

PROFILED_STEP = 6
plain_step, calls = train.train_step, 0


def profiled_step(*args, **kwargs):
    global calls
    calls += 1
    if calls != PROFILED_STEP:
        return plain_step(*args, **kwargs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        out = plain_step(*args, **kwargs)
        float(out["loss"])  # waits for the device inside the trace
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    return out


if __name__ == "__main__":
    train.train_step = profiled_step
    sys.exit(train.main(sys.argv[1:] + ["--benchmark", "5"]))
