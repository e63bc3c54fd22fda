"""Peak memory and time of the supervised local contrast variants against the number of pixels.

Each measurement runs in a fresh subprocess: peak resident memory (ru_maxrss) of one forward and
backward pass of SupConLocalLoss, minus the resident memory just before it. Features are random
(2 views, C channels), labels have a foreground square of about 20 % of the pixels, 2 classes (in 3D a
foreground prism through the depth axis, also about 20 % of the voxels).

    python benchmarks/local_loss_memory.py [--sizes 16 32 64 96 128] [--channels 128] [--plot FILE.png]
    python benchmarks/local_loss_memory.py --volumes 10x14x10 20x28x20 40x56x40   (3D maps; blocks of 8)
    python benchmarks/local_loss_memory.py --from-table docs/costs.md --plot FILE.png

Prints a markdown table with the command, machine and date; ``--plot`` also draws peak memory and
time against the number of pixels, one line per variant ("full" is the naive all-pairs form);
``--from-table`` draws it from a table printed earlier (time is only comparable from a quiet machine).
"""
import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

MODES = {"full": {}, "exact": {"chunk_size": 1024}, "stride": {"stride": 4}, "block": {"block_size": 16}}
BLOCK_3D = {"block_size": 8}  # plans/supconlocal_hu2021.json, 3d_fullres


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(mode: str, shape: tuple, channels: int) -> dict:
    """One forward and backward pass on 2 views of maps of ``shape`` (2 or 3 spatial axes)."""
    import torch
    from nnunet_contrast.losses import SupConLocalLoss

    torch.manual_seed(0)
    torch.set_num_threads(2)
    views = 2
    features = torch.randn(views, channels, *shape, requires_grad=True)
    labels = torch.zeros(views, *shape, dtype=torch.long)
    rows, cols = int(shape[0] * 0.45), int(shape[1] * 0.45)
    labels[:, :rows, :cols // 2] = 1
    labels[:, :rows, cols // 2:cols] = 2
    loss_fn = SupConLocalLoss(0.1, mode=mode, **(BLOCK_3D if mode == "block" and len(shape) == 3 else MODES[mode]))
    warm = torch.randn(2, channels, 4, 4, requires_grad=True)  # lazy imports happen here, not below
    loss_fn(warm, torch.ones(2, 4, 4, dtype=torch.long)).backward()
    before = rss_mb()
    started = time.perf_counter()
    loss = loss_fn(features, labels)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "pixels": int(labels.numel()), "anchors": int((labels > 0).sum()),
            "peak_mb": round(peak - before, 1), "seconds": round(seconds, 3), "loss": round(loss.item(), 4)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 96, 128, 192])
    parser.add_argument("--volumes", nargs="+", metavar="DxHxW", help="3D maps instead of --sizes' squares, e.g. "
                        "40x56x40 (nnU-Net's Hippocampus patch)")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--full-max", type=int, default=128,
                        help="'full' (quadratic memory) only up to as many pixels as a square of this side")
    parser.add_argument("--plot", help="PNG of memory and time against pixels")
    parser.add_argument("--from-table", metavar="FILE",
                        help="plot the rows of a table this script printed earlier (kept in FILE) instead of measuring")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], tuple(map(int, args.one[1].split("x"))), args.channels)))
        return
    if args.from_table:
        if not args.plot:
            parser.error("--from-table needs --plot FILE.png")
        try:
            rows = rows_from_table(args.from_table)
        except OSError as err:
            parser.error(f"--from-table {args.from_table}: {err.strerror}; pass the file that keeps the table")
        if not rows:
            parser.error(f"--from-table {args.from_table} holds no table printed by this script; pass the file "
                         f"that keeps it")
        plot(rows, args.plot, f"(table kept in {args.from_table})")
        return
    print(f"command: python {' '.join(sys.argv)}")
    import torch
    from nnunet_contrast.commands.benchmark.records import cpu_description
    print(f"machine: {platform.node()} {cpu_description(torch)}, {os.cpu_count()} cores; "
          f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print("| variant | pixels (2 views) | anchors | peak extra memory (MB) | fwd+bwd time (s) |")
    print("|---|---|---|---|---|")
    rows = []
    shapes = [tuple(map(int, v.split("x"))) for v in args.volumes] if args.volumes else [(s, s) for s in args.sizes]
    for shape in shapes:
        pixels = 2 * math.prod(shape)
        for mode in MODES:
            if mode == "full" and pixels > 2 * args.full_max ** 2:
                print(f"| full | {pixels} | - | skipped (--full-max {args.full_max}) | - |")
                continue
            out = subprocess.run([sys.executable, __file__, "--one", mode, "x".join(map(str, shape)), "--channels",
                                  str(args.channels)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {mode} | {pixels} | - | failed: {out.stderr.strip().splitlines()[-1]} | - |")
                continue
            r = json.loads(out.stdout)
            rows.append(r)
            print(f"| {r['mode']} | {r['pixels']} | {r['anchors']} | {r['peak_mb']} | {r['seconds']} |", flush=True)
    if args.plot:
        plot(rows, args.plot, " ".join(sys.argv[1:]))


def rows_from_table(path: str) -> list:
    """The measured rows of the first markdown table of this script in a file (skipped and failed rows
    left out); ``[]`` when there is none."""
    rows, in_table = [], False
    for line in open(path).read().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["variant", "pixels (2 views)"]:
            in_table = True
        elif in_table and not line.startswith("|"):
            break
        elif in_table and cells[0] in MODES:
            try:
                rows.append({"mode": cells[0], "pixels": int(cells[1]), "anchors": int(cells[2]),
                             "peak_mb": float(cells[3]), "seconds": float(cells[4])})
            except ValueError:  # "skipped" or "failed" rows
                continue
    return rows


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        for ax, key in zip(axes, ("peak_mb", "seconds")):
            ax.plot([r["pixels"] for r in mine], [max(r[key], 1e-3) for r in mine], marker="o",
                    label=mode if mode != "full" else "full (naive)")
    for ax, label in zip(axes, ("peak extra memory (MB)", "forward + backward time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels (2 views)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SupConLocalLoss variants: local_loss_memory.py {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
