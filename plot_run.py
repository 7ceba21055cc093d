"""Draw a run's curves from its log.jsonl: `python plot_run.py RUN_DIR [RUN_DIR ...]` writes RUN_DIR/curves.png.

train.py calls plot() at the end of every run. Seven panels: the loss terms beside ln K (the loss of a uniform
prediction), kNN top-1 against images seen (the random-init score at 0) and against minutes of wall time, the
teacher's target entropies per image and per batch beside ln K, the mean cosine between images' teacher features
and the share of prototypes in use, the schedules (lr, tau_t, m), and the throughput.

`python plot_run.py --compare OUT.png RUN_DIR [RUN_DIR ...]` draws the kNN curves of several runs on one figure,
against images seen and against minutes; folders named RECIPE-sSEED share a colour per RECIPE (seeds of a recipe).
"""

import json
import math
import re
import sys
from pathlib import Path


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no log.jsonl: expected a train.py output folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: Path, out: Path | None = None) -> Path | None:
    """log.jsonl of run_dir -> a PNG of its curves (default run_dir/curves.png); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = figure(read_log(run_dir), title=Path(run_dir).resolve().name)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def figure(rows: list[dict], title: str = "run"):
    """log.jsonl rows -> a matplotlib figure of seven panels, one point per row that has the quantity."""
    import matplotlib.pyplot as plt
    train_rows = [r for r in rows if "loss" in r]

    def series(key, rows=train_rows):
        pts = [(r.get("images_seen", r["step"]), r[key]) for r in rows if key in r and r[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    ax = axes[0, 0]
    for key in ("loss", "cls", "patch", "koleo"):
        ax.plot(*series(key), marker=".", label=key)
    ln_k = next((r["ln_K"] for r in train_rows if "ln_K" in r), None)
    if ln_k:
        ax.axhline(ln_k, color="gray", ls="--", label=f"ln K = {ln_k:.2f}")
    ax.set_title("loss terms"), ax.legend()
    ax = axes[0, 1]
    ax.plot(*series("knn_top1", rows), marker="o")
    ax.set_title("kNN top-1 (%), teacher [CLS]")
    ax = axes[0, 2]
    knn_rows = [r for r in rows if "knn_top1" in r and "elapsed_s" in r]
    ax.plot([r["elapsed_s"] / 60 for r in knn_rows], [r["knn_top1"] for r in knn_rows], marker="o")
    ax.set_title("kNN top-1 (%) against wall time"), ax.set_xlabel("minutes since the command started")
    ax = axes[0, 3]
    for key in ("target_entropy", "batch_entropy"):
        ax.plot(*series(key), marker=".", label=key)
    if ln_k:
        ax.axhline(ln_k, color="gray", ls="--", label="ln K")
    ax.set_title("teacher target entropy (nats)"), ax.legend()
    ax = axes[1, 0]
    for key in ("feature_cosine", "prototypes_used"):
        ax.plot(*series(key), marker=".", label=key)
    ax.set_ylim(-0.05, 1.05), ax.set_title("collapse diagnostics"), ax.legend()
    ax = axes[1, 1]
    for key in ("lr", "teacher_temp", "momentum"):
        x, y = series(key)
        if y:
            top = max(abs(v) for v in y) or 1.0
            ax.plot(x, [v / top for v in y], marker=".", label=f"{key} / {top:.3g}")
    ax.set_title("schedules (each over its maximum)"), ax.legend()
    ax = axes[1, 2]
    ax.plot(*series("img_per_s"), marker=".")
    ax.set_title("throughput (img/s)")
    axes[1, 3].axis("off")
    for ax in axes.flat:
        if not ax.get_xlabel():
            ax.set_xlabel("images seen")
        ax.grid(alpha=0.3)
    last = train_rows[-1] if train_rows else {}
    minutes = last.get("elapsed_s", math.nan) / 60
    fig.suptitle(f"{title}: {len(train_rows)} log rows, {minutes:.1f} min")
    fig.tight_layout()
    return fig


def compare(run_dirs: list[Path], out: Path) -> Path:
    """The kNN curves of several runs -> one PNG (see compare_figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = compare_figure({Path(d).resolve().name: read_log(d) for d in run_dirs})
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def compare_figure(runs: dict[str, list[dict]]):
    """{run name: log rows} -> a figure of kNN top-1 against images seen and against minutes, one line a run.
    A run named RECIPE-sSEED is drawn in RECIPE's colour, so the seeds of one recipe read as a band."""
    import matplotlib.pyplot as plt
    fig, (by_images, by_minutes) = plt.subplots(1, 2, figsize=(14, 5))
    colours = {}
    for name, rows in runs.items():
        recipe = re.sub(r"-s\d+$", "", name)
        labelled = recipe in colours
        colour = colours.setdefault(recipe, f"C{len(colours) % 10}")
        rows = [r for r in rows if "knn_top1" in r]
        knn = [r["knn_top1"] for r in rows]
        by_images.plot([r.get("images_seen", 0) for r in rows], knn, marker=".", color=colour,
                       label="_" if labelled else recipe, alpha=0.8)
        timed = [r for r in rows if "elapsed_s" in r]  # logs before the field had no time on the init score
        by_minutes.plot([r["elapsed_s"] / 60 for r in timed], [r["knn_top1"] for r in timed], marker=".",
                        color=colour, alpha=0.8)
    by_images.set_xlabel("images seen"), by_minutes.set_xlabel("minutes since the command started")
    for ax in (by_images, by_minutes):
        ax.set_ylabel("kNN top-1 (%)"), ax.grid(alpha=0.3)
    by_images.legend()
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--compare"]:
        if len(args) < 3:
            print("usage: python plot_run.py --compare OUT.png RUN_DIR [RUN_DIR ...]", file=sys.stderr)
            return 2
        try:
            print(compare([Path(d) for d in args[2:]], Path(args[1])))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    dirs = args
    if not dirs:
        print("usage: python plot_run.py RUN_DIR [RUN_DIR ...]  |  --compare OUT.png RUN_DIR [...]", file=sys.stderr)
        return 2
    for d in dirs:
        try:
            path = plot(Path(d))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if path is None:
            print("error: plotting needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
