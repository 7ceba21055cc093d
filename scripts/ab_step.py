"""Two versions of the code, their training steps timed in turn in one process: what a change is worth on a
machine whose speed drifts (separate runs minutes apart differ by 10-40% on the project's 2-core VMs; alternating
step by step cancels that).

    git worktree add /tmp/before HEAD~1
    python scripts/ab_step.py /tmp/before . [--rounds 8] [-- train.py flags]

Each tree's train.py builds its run (train.setup) from the same flags, by default the CPU benchmark shape of docs/performance.md
with views drawn on the device; then each round times one train.train_step of A, then one of B, on a batch drawn
beforehand. Two warm-up rounds are not counted. Prints one JSON line per tree (median and minimum seconds per step,
img/s) and a last line with B's speed over A's.
"""

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

README_CPU_SHAPE = ["--preset", "cifar10", "--dataset", "synthetic", "--arch", "vit_tiny", "--patch-size", "4",
                    "--global-size", "32", "--local-size", "16", "--local-crops", "6", "--batch-size", "64",
                    "--out-dim", "4096", "--device", "cpu", "--device-augment"]
OWN_MODULES = ("train", "ibot_min", "checkpoints", "batched_views", "data", "runtime", "bench", "plot_run")
WARMUP_ROUNDS = 2


def load_train(tree: Path):
    """The train module of a code tree, with its own copies of the project's modules."""
    for name in OWN_MODULES:  # forget the other tree's modules, so that this tree's train imports its own
        sys.modules.pop(name, None)
    sys.path.insert(0, str(tree))
    try:
        return importlib.import_module("train")
    finally:
        sys.path.remove(str(tree))


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else README_CPU_SHAPE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="the code tree before the change")
    p.add_argument("b", type=Path, help="the code tree after it")
    p.add_argument("--rounds", type=int, default=8, help="timed steps of each tree")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    for tree in (args.a, args.b):
        if not (tree / "train.py").is_file():
            p.error(f"{tree} has no train.py: expected a checkout of this project")
    runs = []
    for tree in (args.a, args.b):
        train = load_train(tree.resolve())
        run_args = train.parse_args(flags)
        torch.manual_seed(0)
        run = train.setup(run_args)
        schedules = train.Schedules(run_args, WARMUP_ROUNDS + args.rounds, run.steps_per_epoch, run.global_batch)
        runs.append((train, run, schedules, next(iter(run.epoch_batches(0, 0)))))
    times = [[], []]
    for r in range(WARMUP_ROUNDS + args.rounds):
        for i, (train, run, schedules, batch) in enumerate(runs):
            t0 = time.perf_counter()
            float(train.train_step(run, batch, schedules.at(r), False)["loss"])  # waits for the device
            if r >= WARMUP_ROUNDS:
                times[i].append(time.perf_counter() - t0)
    out = {}
    for name, tree, t, (_, run, _, _) in zip("ab", (args.a, args.b), times, runs):
        out[name] = dict(tree=str(tree), step_s=statistics.median(t), min_step_s=min(t),
                         img_per_s=run.global_batch / statistics.median(t))
        print(json.dumps(out[name]), flush=True)
    out["b_over_a"] = out["a"]["step_s"] / out["b"]["step_s"]
    print(json.dumps(dict(b_over_a=round(out["b_over_a"], 3), rounds=args.rounds, threads=torch.get_num_threads(),
                          torch=torch.__version__)), flush=True)
    return out


if __name__ == "__main__":
    main()
