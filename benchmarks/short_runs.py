"""Short CPU training runs of several trainers on one split and one budget, scored by nnU-Net.

Prepares MSD Task04 Hippocampus (the development copy in ../shared by default) with nnU-Net's own
commands (convert, plan and preprocess 2d), writes the semi-supervised split (``--labeled``), adds
the unlabelled scan, writes one plans file with the budget, then trains each trainer on one fold
with ``nnUNetv2_train``. Each run is scored by nnU-Net's own final validation of that fold
(``fold_X/validation/summary.json``: the fold's validation cases, never used for training).

    python benchmarks/short_runs.py --workdir DIR [--msd ../shared/data/Task04_Hippocampus]
        [--labeled 0.05] [--fold 0] [--trainers T1 T2 ...] [--set KEY=VALUE ...]

Prints a markdown table with the command, machine, date and budget, and writes results.json in
the work folder. Runs whose summary exists are not trained again; a run that was stopped part-way
(a ``checkpoint_latest.pth`` but no summary) is continued with nnU-Net's ``--c``.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TRAINERS = ["nnUNetTrainerLabeledOnly", "nnUNetTrainerPseudoLabelContrast",
                    "nnUNetTrainerPseudoLabelContrastInter", "nnUNetTrainerGlobalLocalContrast",
                    "nnUNetTrainerGlobalContrast", "nnUNetTrainerCrossLevel", "nnUNetTrainerIDEAL"]
# batch 16, 5 epochs x 250 iterations of supervised training, one 250-iteration epoch per pretraining stage
# (IDEAL: Adam 1e-3, as the CPU preset, since the poster's 1e-5 barely moves in 250 steps; 256 positions)
DEFAULT_BUDGET = ["batch_size=16",
                  "nnunet_contrast.budget.num_epochs=5",
                  "nnunet_contrast.budget.num_iterations_per_epoch=250",
                  "nnunet_contrast.budget.num_val_iterations_per_epoch=10",
                  "nnunet_contrast.budget.save_every=1",
                  "nnunet_contrast.semisup.unlabeled_batch_ratio=1.0",
                  "nnunet_contrast.supconlocal.global_epochs=1",
                  "nnunet_contrast.supconlocal.local_epochs=1",
                  "nnunet_contrast.supconlocal.pretrain_iterations_per_epoch=250",
                  "nnunet_contrast.globallocal.global_epochs=1",
                  "nnunet_contrast.globallocal.local_epochs=1",
                  "nnunet_contrast.globallocal.pretrain_iterations_per_epoch=250",
                  "nnunet_contrast.globallocal.pretrain_batch_size=16",
                  "nnunet_contrast.ideal.pretrain_epochs=1",
                  "nnunet_contrast.ideal.pretrain_iterations_per_epoch=250",
                  "nnunet_contrast.ideal.pretrain_lr=0.001",
                  "nnunet_contrast.ideal.sampled_positions=256"]
PLANS = "nnUNetPlans_short"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--msd", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                             "Task04_Hippocampus"))
    parser.add_argument("--labeled", default="0.05")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--set", action="append", default=[], help="extra settings after the default budget")
    args = parser.parse_args()
    from nnunet_contrast.commands.demo import prepare_dataset
    from nnunet_contrast.nnunet_env import command_path

    root = Path(args.workdir)
    budget = DEFAULT_BUDGET + args.set
    env = prepare_dataset(root, args.labeled, budget, plans=PLANS, msd_source=Path(args.msd))
    results_dir = Path(env["nnUNet_results"]) / "Dataset004_Hippocampus"
    results = []
    for trainer in args.trainers:
        fold = results_dir / f"{trainer}__{PLANS}__2d" / f"fold_{args.fold}"
        started, resumed = time.time(), False
        if not (fold / "validation" / "summary.json").exists():
            command = ["nnUNetv2_train", "4", "2d", args.fold, "-tr", trainer, "-p", PLANS, "-device", "cpu"]
            resumed = (fold / "checkpoint_latest.pth").exists()
            command += ["--c"] if resumed else []
            print("$ " + " ".join(command), flush=True)
            with open(root / f"train_{trainer}_fold{args.fold}.log", "a" if resumed else "w") as log:
                subprocess.run([command_path(command[0])] + command[1:], env=env, check=True, stdout=log,
                               stderr=subprocess.STDOUT)
        seconds = time.time() - started
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        results.append({"trainer": trainer, "fold": args.fold, "labeled": args.labeled,
                        "foreground_dice": summary["foreground_mean"]["Dice"],
                        "dice_per_class": {k: v["Dice"] for k, v in summary["mean"].items()},
                        "validation_cases": len(summary["metric_per_case"]),
                        "train_seconds_this_call": round(seconds), "resumed": resumed})
        print(json.dumps(results[-1]), flush=True)
    split = json.loads((root / "nnUNet_preprocessed" / "Dataset004_Hippocampus" / "splits_semisup.json").read_text())
    fold_split = split["folds"][int(args.fold)]
    header = {"command": "python " + " ".join(sys.argv),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU",
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "budget": budget,
              "labelled_cases": len(fold_split["labeled"]), "unlabelled_cases": len(fold_split["unlabeled"])}
    (root / "results.json").write_text(json.dumps({**header, "runs": results}, indent=2) + "\n")
    for key, value in header.items():
        print(f"{key}: {value}")
    print("| trainer | mean foreground Dice | Dice per class | validation cases | s (this call) |")
    print("|---|---|---|---|---|")
    for r in results:
        per_class = ", ".join(f"{k}: {v:.3f}" for k, v in r["dice_per_class"].items())
        print(f"| {r['trainer']} | {r['foreground_dice']:.4f} | {per_class} | {r['validation_cases']} | "
              f"{r['train_seconds_this_call']} |")


if __name__ == "__main__":
    main()
