"""Peak memory and time of the supervised local contrast variants against the number of pixels.

Each measurement runs in a fresh subprocess: peak resident memory (ru_maxrss) of one forward and
backward pass of SupConLocalLoss, minus the resident memory just before it. Features are random
(2 views, C channels), labels have a foreground square of about 20 % of the pixels, 2 classes.

    python benchmarks/local_loss_memory.py [--sizes 16 32 64 96 128] [--channels 128] [--plot FILE.png]
    python benchmarks/local_loss_memory.py --from-table docs/costs.md --plot FILE.png

Prints a markdown table with the command, machine and date; ``--plot`` also draws peak memory and
time against the number of pixels, one line per variant ("full" is the naive all-pairs form);
``--from-table`` draws it from a table printed earlier (time is only comparable from a quiet machine).
"""
import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODES = {"full": {}, "exact": {"chunk_size": 1024}, "stride": {"stride": 4}, "block": {"block_size": 16}}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(mode: str, size: int, channels: int) -> dict:
    import torch
    from nnunet_contrast.losses import SupConLocalLoss

    torch.manual_seed(0)
    torch.set_num_threads(2)
    views = 2
    features = torch.randn(views, channels, size, size, requires_grad=True)
    labels = torch.zeros(views, size, size, dtype=torch.long)
    side = int(size * 0.45)
    labels[:, :side, :side // 2] = 1
    labels[:, :side, side // 2:side] = 2
    loss_fn = SupConLocalLoss(0.1, mode=mode, **MODES[mode])
    warm = torch.randn(2, channels, 4, 4, requires_grad=True)  # lazy imports happen here, not below
    loss_fn(warm, torch.ones(2, 4, 4, dtype=torch.long)).backward()
    before = rss_mb()
    started = time.perf_counter()
    loss = loss_fn(features, labels)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "pixels": views * size * size, "anchors": int((labels > 0).sum()),
            "peak_mb": round(peak - before, 1), "seconds": round(seconds, 3), "loss": round(loss.item(), 4)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 96, 128, 192])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--full-max", type=int, default=128,
                        help="largest map side for the quadratic 'full' variant (memory grows fast)")
    parser.add_argument("--plot", help="PNG of memory and time against pixels")
    parser.add_argument("--from-table", metavar="FILE",
                        help="plot the rows of a table this script printed earlier (kept in FILE) instead of measuring")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.channels)))
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
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print("| variant | pixels (2 views) | anchors | peak extra memory (MB) | fwd+bwd time (s) |")
    print("|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        for mode in MODES:
            if mode == "full" and size > args.full_max:
                print(f"| full | {2 * size * size} | - | skipped (--full-max {args.full_max}) | - |")
                continue
            out = subprocess.run([sys.executable, __file__, "--one", mode, str(size), "--channels",
                                  str(args.channels)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {mode} | {2 * size * size} | - | failed: {out.stderr.strip().splitlines()[-1]} | - |")
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
