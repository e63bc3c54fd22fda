"""One JSON record per finished benchmark run, and the CSV of all of them.

A record holds what identifies the run (trainer, labelled fraction, fold, budget digest and that of the
baseline it pairs with, split seed and the digest of the fold's labelled cases), nnU-Net's validation scores of the fold (mean, per class,
and per case and class, which the CSV leaves out), the wall time of the training calls, the training
time read from nnU-Net's own epoch timestamps (so a run continued with ``--c`` counts only its
epochs, not the pause) and the per-epoch curves of nnU-Net's logger, from which the report redraws
the training curves.
"""
import csv
import datetime
import hashlib
import io
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import List, Optional

from nnunet_contrast.training.progress import STAGE_CURVE, SUPERVISED_CURVE

CURVES = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", STAGE_CURVE, SUPERVISED_CURVE)  # and each
# term's and the teacher's

CSV_COLUMNS = ("budget_digest", "split_seed", "device", "plans", "trainer", "fraction", "upper_bound", "fold",
               "labelled_cases", "unlabelled_cases", "labelled_digest", "foreground_dice", "dice_per_class",
               "wall_seconds", "stopped_calls", "training_seconds", "seconds_per_iteration", "epochs", "date")


def is_term_curve(key: str) -> bool:
    """A loss term's per-epoch curve (``training/progress.py``: ``<term>_loss``)."""
    return key.endswith("_loss")


def is_teacher_curve(key: str) -> bool:
    """The EMA teacher's quality per epoch (``training/self_training.py``: ``teacher_dice`` and per class)."""
    return key.startswith("teacher_")


def seconds_per_iteration(logging: dict, iterations_per_epoch: int) -> float:
    """Mean duration of the epochs of the last stage (nnU-Net's supervised or joint training) divided
    by its training iterations per epoch; an epoch's time includes its validation iterations."""
    durations = epoch_durations(logging)
    stages = list(logging.get(STAGE_CURVE) or [])[:len(durations)] or [0] * len(durations)
    last = [d for d, s in zip(durations, stages) if s == stages[-1]]
    return sum(last) / len(last) / iterations_per_epoch


def epoch_durations(logging: dict) -> List[float]:
    return [end - start for start, end in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]


def run_record(run, fold_folder: Path, preprocessed: Path, budget, seed: int, device: str,
               wall_seconds: Optional[float], stopped_calls: int = 0) -> dict:
    """The record of a finished run; the split is the one the run trained on (its saved settings).
    ``wall_seconds`` leaves out ``stopped_calls`` training calls that were killed (their time is unknown)."""
    import torch

    summary = json.loads((fold_folder / "validation" / "summary.json").read_text())
    settings = json.loads((fold_folder / "nnunet_contrast_settings.json").read_text())
    split = json.loads((Path(preprocessed) / settings["semisup"]["split_file"]).read_text())
    logging = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    fold_split = split["folds"][run.fold]
    iterations = settings["budget"]["num_iterations_per_epoch"]
    return {
        "trainer": run.trainer, "fraction": run.fraction, "fold": run.fold, "upper_bound": run.is_upper_bound,
        "plans": fold_folder.parent.name.split("__")[1], "budget_preset": budget.preset,  # TRAINER__PLANS__2d
        "budget_set": list(budget.assignments), "budget_digest": budget.digest, "split_seed": seed,
        "configuration": budget.configuration, "source_plans": budget.source_plans,
        "baseline_digest": budget.for_baseline().digest,  # the budget of the LabeledOnly it pairs with
        "train_seed": settings["run"]["seed"],  # -1: unseeded
        "split_file": settings["semisup"]["split_file"], "device": device,
        "labelled_cases": len(fold_split["labeled"]), "unlabelled_cases": len(fold_split["unlabeled"]),
        "labelled_digest": hashlib.sha256(json.dumps(sorted(fold_split["labeled"])).encode()).hexdigest()[:8],
        "validation_cases": len(summary["metric_per_case"]),
        "foreground_dice": summary["foreground_mean"]["Dice"],
        "dice_per_class": {k: v["Dice"] for k, v in summary["mean"].items()},
        "case_dice": case_dice(summary),
        "epochs": len(epoch_durations(logging)),
        "wall_seconds": wall_seconds,
        "stopped_calls": stopped_calls,
        "training_seconds": round(sum(epoch_durations(logging)), 1),
        "seconds_per_iteration": round(seconds_per_iteration(logging, iterations), 4),
        "curves": {k: [finite_or_none(v) for v in logging[k]] for k in logging if k in CURVES or is_term_curve(k) or is_teacher_curve(k)},
        "settings": settings,
        "environment": environment(),
    }


def case_dice(summary: dict) -> dict:
    """Reference file name -> class -> Dice of nnU-Net's validation, ``None`` where nnU-Net scores NaN
    (the class is in neither the reference nor the prediction)."""
    return {Path(entry["reference_file"]).name: {k: finite_or_none(m["Dice"]) for k, m in entry["metrics"].items()}
            for entry in summary["metric_per_case"]}


def finite_or_none(value) -> Optional[float]:
    """JSON has no NaN: epochs without a contrastive loss are written as null."""
    value = float(value)
    return value if math.isfinite(value) else None


def environment() -> dict:
    from importlib.metadata import version

    import torch

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "cpu": cpu_description(torch),
            "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
            "nnunet_contrast": version("nnunet-contrast"), "commit": source_commit()}


def kind(record: dict) -> str:
    """The processor kind the run trained on (``cpu_description``)."""
    return record["environment"]["cpu"]


def cpu_description(torch) -> str:
    """The processor model and the instruction set torch's CPU kernels use (e.g. AVX512): a seeded run
    repeats to the digit on one kind of processor, not across kinds (docs/BENCHMARKS.md)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:  # not Linux
        model = platform.processor()
    return f"{model or 'unknown processor'}, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def source_commit() -> str:
    """The git commit of this package's source: the checkout's (source tree, editable install), else the
    one a regular install recorded (``hatch_build.py``), else ''."""
    package = Path(__file__).resolve().parents[2]
    if (package.parent / ".git").exists():
        try:
            result = subprocess.run(["git", "-C", str(package), "describe", "--always", "--dirty", "--abbrev=7"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                return result.stdout.strip()
        except OSError:  # no git on this machine
            pass
    recorded = package / "COMMIT"
    return recorded.read_text().strip() if recorded.exists() else ""


def load_records(workdir: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(workdir) / "results").glob("*/*.json"))]


def csv_text(records: List[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = dict(record, date=record["environment"]["date"], dice_per_class=json.dumps(record["dice_per_class"]))
        writer.writerow(row)
    return buffer.getvalue()


def write_csv(workdir: Path) -> Path:
    from nnunet_contrast.nnunet_env import write_text_atomic

    path = Path(workdir) / "results.csv"
    write_text_atomic(path, csv_text(load_records(workdir)))
    return path
