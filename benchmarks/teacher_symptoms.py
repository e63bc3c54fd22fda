"""The weak-teacher symptom table of issue 27, from committed benchmark records.

For every self-training record of a records folder: its setting (the ``--set`` it differs by), the EMA
teacher right after the warm-up (its first epoch: foreground Dice per class on the validation batches, the
share of unlabelled training pixels whose pseudo-label it kept), how its confident pixels' Dice moved over
the stage, the final Dice, and the paired difference to the LabeledOnly it pairs with in the report (same split,
fold, budget and processor kind), with the share of the gap to ``--upper-bound`` it closes.

    python benchmarks/teacher_symptoms.py docs/benchmark/hippocampus_weak_teacher_proxy_avx512 --upper-bound 0.8430
"""
import argparse
import math
from pathlib import Path

BASELINE = "nnUNetTrainerLabeledOnly"


def first_teacher_epoch(curves: dict) -> int:
    return next(i for i, v in enumerate(curves["teacher_dice"]) if v is not None)


def text(value, digits=3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def per_class(curves: dict, name: str, epoch: int, classes) -> str:
    return " / ".join(text(curves[f"teacher_{name}_{c}"][epoch], 2) for c in classes)


def row(record: dict, baseline: dict, upper_bound: float) -> str:
    curves = record["curves"]
    start = first_teacher_epoch(curves)
    classes = sorted(k.rsplit("_", 1)[1] for k in curves if k.startswith("teacher_dice_") and not k.endswith("_0"))
    kept = curves.get("teacher_kept_share")
    kept_text = "not recorded" if kept is None else f"{100 * kept[start]:.0f} % -> {100 * kept[-1]:.0f} %"
    difference = record["foreground_dice"] - baseline["foreground_dice"]
    gap = upper_bound - baseline["foreground_dice"]
    setting = ", ".join(s.split("nnunet_contrast.")[-1] for s in record["budget_set"] if "budget." not in s) or "defaults"
    return (f"| {setting} | {record['fraction']} | {per_class(curves, 'dice', start, classes)} | {kept_text} | "
            f"{per_class(curves, 'confident_dice', start, classes)} -> {per_class(curves, 'confident_dice', -1, classes)} | "
            f"{baseline['foreground_dice']:.4f} | {record['foreground_dice']:.4f} | {difference:+.4f} | "
            f"{100 * difference / gap:.0f} % | {record['environment'].get('commit', '?')} |")


def main() -> None:
    from nnunet_contrast.commands.benchmark.records import load_records
    from nnunet_contrast.commands.benchmark.report import group_records, kind, shared_baseline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("--upper-bound", type=float, required=True, help="all labels' Dice on the same fold")
    args = parser.parse_args()
    print("| setting | labelled | teacher after the warm-up: Dice per class | pseudo-labels kept, first -> last "
          "epoch | teacher's confident Dice per class, first -> last epoch | LabeledOnly | SelfTraining | difference | "
          "share of the gap | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (digest, _, _), group in sorted(group_records(load_records(args.records)).items()):
        reported, _ = shared_baseline(group, digest)  # the baseline each run pairs with, as the report's
        key = lambda r: (r["fraction"], r["fold"], kind(r))  # noqa: E731
        baselines = {key(r): r for r in reported if r["trainer"] == BASELINE}
        for record in reported:
            if record["trainer"] != BASELINE and key(record) in baselines and "teacher_dice" in record["curves"]:
                print(row(record, baselines[key(record)], args.upper_bound))


if __name__ == "__main__":
    main()
