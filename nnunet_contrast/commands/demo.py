"""``nnunet-contrast demo``: the whole workflow on the embedded Hippocampus sample, on the CPU.

It runs the real commands a user runs (nnU-Net's and ours) in a scratch folder: convert the MSD
sample, plan and preprocess 2d, split, add the unlabelled scan, write a CPU-budget plans file,
train fold 0, predict the 6 held-out scans and evaluate them with nnU-Net's evaluation.
"""
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from nnunet_contrast.commands.plans import set_options
from nnunet_contrast.nnunet_env import command_path, nnunet_environment
from nnunet_contrast.resources import sample_dir

DATASET = "4"
PLANS = "nnUNetPlans_demo"
UNLABELED_CASE = "hippocampus_118"


def run(args: List[str], env: dict) -> None:
    print("$ " + " ".join(args), flush=True)
    started = time.time()
    subprocess.run([command_path(args[0])] + args[1:], env=env, check=True,
                   stdout=sys.stdout, stderr=sys.stderr)
    print(f"  ({time.time() - started:.0f} s)", flush=True)


def run_demo(trainer: str = "nnUNetTrainerSupConLocal", workdir: Optional[Path] = None, labeled: str = "0.25",
             settings: List[str] = (), seed: int = 0) -> dict:
    """Runs the demo and returns nnU-Net's evaluation summary of the held-out scans. ``seed`` is the
    training seed (``nnunet_contrast.run.seed``; -1: unseeded, as nnU-Net); ``settings`` come after it."""
    scratch = None
    if workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix="nnunet_contrast_demo_")
        workdir = Path(scratch.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        summary = _demo_steps(trainer, workdir, labeled, [f"nnunet_contrast.run.seed={seed}"] + list(settings))
        print("files removed (pass --workdir DIR to keep them)" if scratch else f"files in {workdir}")
        return summary
    finally:
        if scratch is not None:
            scratch.cleanup()


def prepare_dataset(root: Path, labeled: str = "0.25", settings: List[str] = (), plans: str = PLANS,
                    msd_source: Optional[Path] = None) -> dict:
    """Convert, plan, split, add the unlabelled scan and write the CPU-budget plans ``plans``.

    Returns the nnU-Net environment of ``root``. ``msd_source`` defaults to the embedded sample.
    The held-out test scans of the sample are copied to ``root/heldout``.
    """
    env = nnunet_environment(root)
    msd = root / "Task04_Hippocampus"
    if not msd.exists():
        shutil.copytree(msd_source or sample_dir(), msd)
    raw = Path(env["nnUNet_raw"]) / "Dataset004_Hippocampus"
    if not raw.exists():
        run(["nnUNetv2_convert_MSD_dataset", "-i", str(msd), "-np", "2"], env)
    if not (Path(env["nnUNet_preprocessed"]) / "Dataset004_Hippocampus" / "nnUNetPlans_2d").exists():
        run(["nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "2d", "-np", "2"], env)
    run(["nnunet-contrast", "split", "-d", DATASET, "--labeled", labeled, "--force"], env)
    unlabeled, heldout = root / "unlabeled", root / "heldout"
    for folder in (unlabeled, heldout):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    for image in sorted((raw / "imagesTs").iterdir()):
        target = unlabeled if image.name.startswith(UNLABELED_CASE) else heldout
        shutil.copy(image, target / image.name)
    run(["nnunet-contrast", "add-unlabeled", "-d", DATASET, "-i", str(unlabeled)], env)
    run(["nnunet-contrast", "plans", "-d", DATASET, "--preset", "cpu_budget", *set_options(settings), "-o", plans,
         "--force"], env)
    return env


def _demo_steps(trainer: str, root: Path, labeled: str, settings: List[str]) -> dict:
    started = time.time()
    env = prepare_dataset(root, labeled, settings)
    msd, heldout = root / "Task04_Hippocampus", root / "heldout"
    run(["nnUNetv2_train", DATASET, "2d", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu"], env)
    predictions = root / f"predictions_{trainer}"
    run(["nnUNetv2_predict", "-i", str(heldout), "-o", str(predictions), "-d", DATASET, "-c", "2d",
         "-tr", trainer, "-p", PLANS, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    model = Path(env["nnUNet_results"]) / "Dataset004_Hippocampus" / f"{trainer}__{PLANS}__2d"
    summary_file = predictions / "summary.json"
    run(["nnUNetv2_evaluate_folder", str(msd / "labelsTs"), str(predictions), "-djfile",
         str(model / "dataset.json"), "-pfile", str(model / "plans.json"), "-o", str(summary_file)], env)
    summary = json.loads(summary_file.read_text())
    per_class = {k: round(v["Dice"], 4) for k, v in summary["mean"].items()}
    print(f"\nnnunet-contrast demo: {trainer}, {len(list(heldout.iterdir()))} held-out Hippocampus scans, "
          f"labelled fraction {labeled}, CPU budget preset, {settings[0]}")
    print(f"Dice per class {per_class}; mean foreground Dice {summary['foreground_mean']['Dice']:.4f}")
    print("What this number means: a few minutes of training on a 47-volume sample, scored on 6 scans. It shows "
          "that the workflow runs end to end, not how well the method segments: short runs like this one move by "
          "several hundredths between seeds. Measured comparisons on real data: docs/BENCHMARKS.md.")
    print(f"total time {time.time() - started:.0f} s")
    return summary
