"""``nnunet-contrast report``: tables and plots of a benchmark, redrawn from its result files only.

One section per budget digest, split seed and device, so runs of different budgets or splits never
share a table: the Dice table (method x labelled fraction, mean and standard deviation over folds), the
difference to ``nnUNetTrainerLabeledOnly`` on the same fraction and fold, the same per validation case
with a bootstrap interval, the training cost, a PNG of Dice against the labelled fraction and each
run's training curves.

A seeded run repeats to the digit on one kind of processor but not across kinds (docs/BENCHMARKS.md),
so a run is a *repeat*: its fold and its processor kind. Records of several kinds (``--also`` work
folders) share one section; a method is paired with the baseline only on the same fold and kind, and
with several kinds each repeat is named ``f0/K2`` and a by-fold table averages each fold's kinds first.
"""
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from nnunet_contrast.commands.benchmark.records import is_term_curve, kind, load_records
from nnunet_contrast.commands.benchmark.runs import (ALL_LABELS, BASELINE, BASELINE_SECTIONS, BASELINE_TRAINERS,
                                                   DEFAULT_CONFIGURATION, DEFAULT_PLANS, baseline_reads)
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.nnunet_env import write_text_atomic
from nnunet_contrast.plotting import pyplot, save_figure
from nnunet_contrast.training.progress import KEPT_CURVE, SUPERVISED_CURVE

UPPER_BOUND_NAME = "nnU-Net, all labels (LabeledOnly at 1.0)"
Repeat = Tuple[int, str]  # (fold, short name of the processor kind; "" when the records share one kind)


def report_records(workdir: Path, also: Iterable[Path] = ()) -> List[dict]:
    """The records of ``workdir`` and of each work folder in ``also``, each with the folder it came from
    (``source``)."""
    records = []
    for folder in [Path(workdir), *map(Path, also)]:
        found = load_records(folder)
        if folder != Path(workdir) and not found:
            raise UserInputError(f"--also {folder} holds no finished runs (no results/*/*.json): pass the work "
                                 "folder of a benchmark")
        records += [dict(r, source=folder) for r in found]
    return records


def kind_names(records: Sequence[dict]) -> Dict[str, str]:
    """Processor kind -> K1, K2, ... in the order of their first run; {} when all records share one kind."""
    names: Dict[str, str] = {}
    for r in sorted(records, key=lambda r: r["environment"]["date"]):
        names.setdefault(kind(r), f"K{len(names) + 1}")
    return names if len(names) > 1 else {}


def repeat_of(record: dict, names: Dict[str, str]) -> Repeat:
    """The record's repeat: its fold and the short name of its processor kind (``names``: ``kind_names``)."""
    return record["fold"], names.get(kind(record), "")


def repeat_label(key) -> str:
    """``f0`` for a fold (or a repeat on the only kind), ``f0/K2`` for a repeat on one of several kinds."""
    fold, short = key if isinstance(key, tuple) else (key, "")
    return f"f{fold}/{short}" if short else f"f{fold}"


def repeats_text(keys: Iterable) -> str:
    """``2 folds``, or ``2 folds, 3 runs`` where a fold ran on several processor kinds."""
    keys = list(keys)
    folds = len({key[0] if isinstance(key, tuple) else key for key in keys})
    text = f"{folds} fold{'s' * (folds != 1)}"
    return text if folds == len(keys) else f"{text}, {len(keys)} runs"


def baseline_digest(record: dict, digests: Dict[tuple, str]) -> str:
    """The budget digest of the baseline a record pairs with. Records before ``baseline_digest`` existed: the
    digest of their budget without the settings the baseline ignores, where a record of that budget exists
    (``digests``: (preset, assignments) -> digest), else their own."""
    if "baseline_digest" in record:
        return record["baseline_digest"]
    shared = (record["budget_preset"], tuple(a for a in record["budget_set"] if baseline_reads(a)))
    return digests.get(shared, record["budget_digest"])


def group_records(records: Sequence[dict]) -> Dict[tuple, List[dict]]:
    """(the baseline's budget digest, split seed, device) -> the records that pair with that baseline."""
    digests = {(r["budget_preset"], tuple(r["budget_set"])): r["budget_digest"] for r in records}
    groups = defaultdict(list)
    for record in records:
        groups[(baseline_digest(record, digests), record["split_seed"], record["device"])].append(record)
    return dict(groups)


def shared_baseline(records: Sequence[dict], digest: str) -> Tuple[List[dict], List[dict]]:
    """(the records a section reports, the other records of the baseline or recipe): where the same baseline
    run exists under several budget digests (trained again by a benchmark before it shared the baseline), one
    counts: a run not continued with ``--c`` (which does not repeat to the digit), of the section's own digest,
    the earliest; the others are shown as repeats."""
    names, chosen, kept, others = kind_names(records), {}, [], []
    for r in sorted(records, key=lambda r: (bool(r.get("stopped_calls")), r["budget_digest"] != digest,
                                            r["environment"]["date"])):
        key = (r["trainer"], r["fraction"], *repeat_of(r, names))
        if r["trainer"] in BASELINE_TRAINERS and key in chosen and chosen[key]["budget_digest"] != r["budget_digest"]:
            others.append(r)
        else:
            kept.append(r)
            chosen.setdefault(key, r)
    return kept, others


def compared_settings(record: dict) -> Dict[str, str]:
    """``section.key`` -> value of the settings a method's runs can differ in (not budget, split or run)."""
    return {f"{section}.{key}": json.dumps(value) for section, values in record.get("settings", {}).items()
            if section not in BASELINE_SECTIONS for key, value in values.items()}


def method_assignments(record: dict) -> Dict[str, str]:
    """``section.key`` -> value of the record's ``--set`` assignments that the baseline ignores."""
    pairs = (a.split("=", 1) for a in record["budget_set"] if not baseline_reads(a))
    return {key.split(".", 1)[1]: value for key, value in pairs}


def setting_labels(runs: Sequence[dict]) -> List[str]:
    """For the runs of one trainer, what tells them apart: the resolved settings in which a run differs from
    the value most of them have (among the settings every run records; older code records fewer), and the
    ``--set`` assignments that not every run has. Runs as most are have no label."""
    resolved, assigned = [compared_settings(r) for r in runs], [method_assignments(r) for r in runs]
    common = set.intersection(*(set(s) for s in resolved))
    usual = {k: Counter(s[k] for s in resolved).most_common(1)[0][0] for k in sorted(common)}
    named = {k for a in assigned for k in a if len({a.get(k) for a in assigned}) > 1}
    return [", ".join([f"{k}={json.loads(s[k])}" for k in usual if s[k] != usual[k]] +
                      [f"{k}={a[k]}" for k in sorted(named - set(usual)) if k in a])
            for s, a in zip(resolved, assigned)]


def with_setting_labels(records: Sequence[dict]) -> List[dict]:
    """Records whose ``trainer`` names, where one trainer ran with several settings, the settings that tell
    them apart: one row per trainer and setting. Never for the baseline and the recipe: one run per repeat,
    and the settings that differ are ones they ignore."""
    by_trainer = defaultdict(list)
    for r in records:
        by_trainer[r["trainer"]].append(r)
    return [dict(r, trainer=f"{trainer} ({label})" if label else trainer)
            for trainer, runs in by_trainer.items()
            for r, label in zip(runs, [""] * len(runs) if trainer in BASELINE_TRAINERS else setting_labels(runs))]


def mean_spread(values: Sequence[float], signed: bool = False) -> str:
    """``0.830`` for one fold, ``0.830 ± 0.004 (n=3)`` (standard deviation) for several, ``""`` for none."""
    if not values:
        return ""
    mean = f"{statistics.mean(values):{'+' if signed else ''}.3f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.3f} (n={len(values)})"


def method_order(records: Sequence[dict]) -> List[str]:
    names = sorted({r["trainer"] for r in records if not r["upper_bound"]})
    return sorted(names, key=lambda n: n != BASELINE)


def fraction_order(records: Sequence[dict]) -> List[str]:
    """The labelled fractions (or counts) of the method runs, by their mean number of labelled cases."""
    fractions = {r["fraction"] for r in records if not r["upper_bound"]}
    return sorted(fractions, key=lambda f: mean_labelled_cases(records, f))


def mean_labelled_cases(records: Sequence[dict], fraction: str) -> float:
    return statistics.mean(r["labelled_cases"] for r in records if r["fraction"] == fraction)


def by_cell(records: Sequence[dict]) -> Dict[tuple, Dict[Repeat, dict]]:
    """(trainer, fraction) -> repeat (fold, kind) -> record."""
    names = kind_names(records)
    cells: Dict[tuple, Dict[Repeat, dict]] = defaultdict(dict)
    for r in records:
        repeat = repeat_of(r, names)
        if repeat in cells[(r["trainer"], r["fraction"])]:
            raise UserInputError(f"two records of {r['trainer']} at {r['fraction']}, {repeat_label(repeat)} on "
                                 f"{kind(r)}: report each work folder of one processor kind once")
        cells[(r["trainer"], r["fraction"])][repeat] = r
    return cells


def dice_table(records: Sequence[dict]) -> List[str]:
    """Methods x labelled fractions; the upper bound has its own column ("all labels")."""
    fractions, cells = fraction_order(records), by_cell(records)
    upper = [r["foreground_dice"] for r in cells.get((BASELINE, ALL_LABELS), {}).values()]
    headers = [f"{f} ({labelled_counts(cells, f)} labelled)" for f in fractions]
    headers += [f"all labels ({labelled_counts(cells, ALL_LABELS)} labelled)"] if upper else []
    lines = [table_row("method", headers), "|---" * (len(headers) + 1) + "|"]
    for trainer in method_order(records):
        values = [mean_spread([r["foreground_dice"] for r in cells[(trainer, f)].values()]) for f in fractions]
        lines.append(table_row(trainer, values + [""] * bool(upper)))
    if upper:
        lines.append(table_row(UPPER_BOUND_NAME, [""] * len(fractions) + [mean_spread(upper)]))
    return lines


def table_row(name: str, cells: Sequence[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def labelled_counts(cells: Dict[tuple, Dict[int, dict]], fraction: str) -> str:
    counts = sorted({r["labelled_cases"] for (t, f), folds in cells.items() if f == fraction for r in folds.values()})
    return "/".join(str(c) for c in counts)


def paired(cells: Dict[tuple, Dict[Repeat, dict]], trainer: str, fraction: str, reference: tuple) -> Dict[Repeat, tuple]:
    """Repeat -> (the trainer's Dice, the reference cell's Dice) on the repeats (fold and kind) both have."""
    ours, theirs = cells.get((trainer, fraction), {}), cells.get(reference, {})
    return {k: (ours[k]["foreground_dice"], theirs[k]["foreground_dice"]) for k in sorted(set(ours) & set(theirs))}


def with_folds(values: Dict, signed: bool = True) -> str:
    """``mean ± sd (n=3): f0 +0.010, f1 ...`` (repeats or folds listed from two on)."""
    text = mean_spread(list(values.values()), signed=signed)
    if len(values) > 1:
        text += ": " + ", ".join(f"{repeat_label(k)} {v:{'+' if signed else ''}.3f}" for k, v in values.items())
    return text


def fold_means(values: Dict[Repeat, float]) -> Dict[int, float]:
    """Fold -> the mean over that fold's processor kinds."""
    folds = defaultdict(list)
    for (fold, _), value in sorted(values.items()):
        folds[fold].append(value)
    return {fold: statistics.mean(v) for fold, v in folds.items()}


def gains(cells: Dict[tuple, Dict[Repeat, dict]], trainer: str, fraction: str) -> Dict[Repeat, float]:
    """Repeat -> the trainer's Dice minus the baseline's at the same fraction, fold and kind."""
    return {k: a - b for k, (a, b) in paired(cells, trainer, fraction, (BASELINE, fraction)).items()}


def gap_shares(cells: Dict[tuple, Dict[Repeat, dict]], trainer: str, fraction: str) -> Dict[Repeat, float]:
    """Repeat -> (method - baseline) / (upper - baseline), the share of the gap to all labels closed, on the
    repeats that have an upper bound above the baseline."""
    upper = {k: r["foreground_dice"] for k, r in cells.get((BASELINE, ALL_LABELS), {}).items()}
    return {k: (a - b) / (upper[k] - b) for k, (a, b) in paired(cells, trainer, fraction, (BASELINE, fraction)).items()
            if k in upper and upper[k] > b}


def method_table(records: Sequence[dict], cell_text) -> List[str]:
    """Methods (not the baseline) x fractions, each cell ``cell_text(cells, trainer, fraction)``."""
    fractions, cells = fraction_order(records), by_cell(records)
    lines = [table_row("method", fractions), "|---" * (len(fractions) + 1) + "|"]
    return lines + [table_row(trainer, [cell_text(cells, trainer, f) for f in fractions])
                    for trainer in method_order(records) if trainer != BASELINE]


def delta_table(records: Sequence[dict]) -> List[str]:
    """Paired difference to the baseline at the same fraction: its mean, spread and each repeat's."""
    if not fraction_order(records):
        return ["(no method runs yet)"]
    return method_table(records, lambda cells, trainer, f: with_folds(gains(cells, trainer, f)))


def gap_table(records: Sequence[dict]) -> List[str]:
    """Share of the gap between the baseline and the upper bound (all labels) that a method closes,
    per repeat, then its mean."""
    if not by_cell(records).get((BASELINE, ALL_LABELS)) or not fraction_order(records):
        return []
    return [f"Share of the gap between {BASELINE} and all labels that the method closes, per "
            f"{'fold and processor kind' if kind_names(records) else 'fold'} "
            "(1: as good as all labels; negative: worse than the baseline):", "",
            *method_table(records, lambda cells, trainer, f: with_folds(gap_shares(cells, trainer, f))), ""]


def kind_spread_table(records: Sequence[dict]) -> List[str]:
    """The same seeded run (trainer, fraction, fold) on several processor kinds: its range over the kinds per
    fold, and the standard deviation pooled over folds, a measurement of run-to-run noise."""
    cells, rows = by_cell(records), []
    for (trainer, fraction), repeats in sorted(cells.items(), key=lambda item: (item[0][0] != BASELINE, item[0])):
        folds = defaultdict(list)
        for (fold, _), r in sorted(repeats.items()):
            folds[fold].append(r["foreground_dice"])
        folds = {fold: values for fold, values in folds.items() if len(values) > 1}
        if folds:
            pooled = statistics.mean(statistics.variance(v) for v in folds.values()) ** 0.5
            ranges = ", ".join(f"f{fold} {max(v) - min(v):.4f} ({len(v)} kinds)" for fold, v in folds.items())
            rows.append(table_row(f"{trainer} at {fraction}", [ranges, f"{pooled:.4f}"]))
    if not rows:
        return []
    return ["The same seeded run on several processor kinds (floating-point differences alone): Dice range per "
            "fold, and the standard deviation pooled over folds:", "",
            table_row("run", ["max - min over kinds", "pooled sd"]), "|---|---|---|", *rows, ""]


def fold_table(records: Sequence[dict]) -> List[str]:
    """With several processor kinds: each fold's paired difference and gap share averaged over its kinds,
    then over folds, so a fold counts once however many kinds ran it."""
    if not kind_names(records) or not fraction_order(records):
        return []

    def cell_text(cells, trainer, f):
        text = with_folds(fold_means(gains(cells, trainer, f)))
        shares = fold_means(gap_shares(cells, trainer, f))
        return text + (f"; gap closed {with_folds(shares)}" if shares else "")

    return ["By fold (each fold's repeats on several processor kinds averaged first): the difference to "
            f"{BASELINE}, then the share of the gap to all labels closed:", "", *method_table(records, cell_text), ""]


MIN_CASES_FOR_INTERVAL = 10  # a percentile bootstrap of fewer cases gives too narrow an interval


def case_rows(records: Sequence[dict]) -> List[tuple]:
    """(method, one cell per fraction): the per-case paired difference to the baseline (see case_section)."""
    fractions, cells = fraction_order(records), by_cell(records)
    return [(trainer, [interval_text(case_differences(cells.get((BASELINE, f), {}), cells[(trainer, f)]))
                       for f in fractions])
            for trainer in method_order(records) if trainer != BASELINE]


def case_differences(baseline: Dict[Repeat, dict], method: Dict[Repeat, dict]) -> Dict[Repeat, List[float]]:
    """Repeat -> the method's minus the baseline's Dice of each validation case both records score, paired
    by case name."""
    diffs = {}
    for fold in sorted(set(baseline) & set(method)):
        base, ours = baseline[fold]["case_dice"], method[fold]["case_dice"]
        values = [case_difference(ours[c], base[c]) for c in sorted(set(base) & set(ours))]
        diffs[fold] = [v for v in values if v is not None]
    return diffs


def case_difference(ours: Dict[str, float], base: Dict[str, float]) -> Optional[float]:
    """Mean over classes of the Dice difference of one case. nnU-Net scores a class that is in neither the
    reference nor the prediction as NaN (None here): against a prediction that has the class (Dice 0),
    that empty prediction is right and scores 1. None when no class is scored by either."""
    diffs = [(1.0 if ours[k] is None else ours[k]) - (1.0 if base[k] is None else base[k])
             for k in ours if k in base and not (ours[k] is None and base[k] is None)]
    return sum(diffs) / len(diffs) if diffs else None


def interval_text(diffs_by_fold: Dict, resamples: int = 10000) -> str:
    """``+0.003 [-0.002, +0.008], better 29 / worse 23 of 52 cases (1 fold)``: the mean, a seeded
    bootstrap 95 % interval that resamples cases within each fold, and the cases won and lost."""
    import numpy as np

    values = np.asarray([v for fold in diffs_by_fold.values() for v in fold], dtype=float)
    if values.size == 0:
        return ""
    text = f"{values.mean():+.3f}"
    if values.size >= MIN_CASES_FOR_INTERVAL:
        from scipy.stats import bootstrap

        folds = [np.asarray(fold, dtype=float) for fold in diffs_by_fold.values() if len(fold)]
        # scipy resamples each sample (fold) on its own: the pooled mean of a stratified bootstrap
        pooled_mean = lambda *samples, axis: sum(f.sum(axis=axis) for f in samples) / values.size  # noqa: E731
        result = bootstrap(folds, pooled_mean, n_resamples=resamples, method="percentile", vectorized=True,
                           random_state=np.random.default_rng(0))
        low, high = result.confidence_interval
        text += f" [{low:+.3f}, {high:+.3f}]"
    return (text + f", better {int((values > 0).sum())} / worse {int((values < 0).sum())} of {values.size} cases "
            f"({repeats_text(diffs_by_fold)})")


def cost_table(records: Sequence[dict]) -> List[str]:
    lines = ["| method | fraction | fold | epochs | wall time (s) | sum of epoch times (s) | s per iteration "
             "(last stage) |", "|---|---|---|---|---|---|---|"]
    names = kind_names(records)
    for r in sorted(records, key=lambda r: (r["trainer"], r["labelled_cases"], *repeat_of(r, names))):
        wall = "" if r.get("wall_seconds") is None else f"{r['wall_seconds']:.0f}"
        wall += f" + {r['stopped_calls']} killed call(s)" if r.get("stopped_calls") else ""
        wall += f" (SOURCE's run: {r['source_wall_seconds']:.0f})" if r.get("source_wall_seconds") is not None else ""
        repeat = repeat_label(repeat_of(r, names))
        lines.append(f"| {r['trainer']} | {r['fraction']} | {repeat} | {r['epochs']} | {wall} | "
                     f"{r['training_seconds']:.0f} | {r['seconds_per_iteration']:.3f} |")
    return lines


def fraction_repeats(cells: Dict[tuple, Dict[Repeat, dict]], fraction: str) -> set:
    """Every repeat (fold, kind) that any method ran at ``fraction``."""
    return {k for (_, f), repeats in cells.items() if f == fraction for k in repeats}


def complete_mean(values: Dict[Repeat, float], repeats: set) -> Optional[float]:
    """The mean over ``repeats`` where ``values`` has every one of them, else None: the plotted means of one
    fraction all cover the same folds and kinds, so a trainer run on fewer of them shows its points only."""
    return statistics.mean(values[k] for k in repeats) if repeats and repeats <= set(values) else None


MARKERS = "oDs^v<>ph*"


def trainer_style(index: int, count: int, trainer: str) -> dict:
    """Colour and marker unique to each of up to 100 trainers, and a small sideways shift (a factor on the
    log axis) so that the points of many trainers at one fraction stay apart."""
    return dict(color=f"C{index % 10}", marker=MARKERS[index // 10 % len(MARKERS)],
                linewidth=2.5 if trainer == BASELINE else 1.2, shift=1.012 ** (index - (count - 1) / 2))


def style_indices(records: Sequence[dict]) -> Dict[str, int]:
    """Each trainer's style index: the baseline's 0, the others' in the order of their first record, so that a
    trainer keeps its colour and marker when later ones join the report."""
    first = {}
    for r in sorted(records, key=lambda r: r["environment"]["date"]):
        first.setdefault(r["trainer"], len(first))
    order = sorted(method_order(records), key=lambda t: (t != BASELINE, first[t]))
    return {trainer: index for index, trainer in enumerate(order)}


def plot_dice(records: Sequence[dict], path: Path) -> None:
    """Left: Dice against the (mean) number of labelled cases, so fractions and counts share one axis; right:
    the paired difference to the baseline. Each repeat (fold and kind) is a point; a line joins a trainer's
    means where it ran every repeat of the fraction (``complete_mean``); the upper bound is the dashed line.
    The legend stands outside the panels: a benchmark can hold twenty trainers and more."""
    fractions, cells = fraction_order(records), by_cell(records)
    fig, (dice_ax, gain_ax) = pyplot().subplots(1, 2, figsize=(17, 5.5), dpi=100)
    trainers, indices = method_order(records), style_indices(records)
    for trainer in trainers:
        style = trainer_style(indices[trainer], len(trainers), trainer)
        for ax, values_of in ((dice_ax, lambda f: {k: r["foreground_dice"] for k, r in cells[(trainer, f)].items()}),
                              (gain_ax, lambda f: gains(cells, trainer, f))):
            if ax is gain_ax and trainer == BASELINE:
                continue
            plot_points_and_means(ax, records, fractions, values_of, cells, trainer.replace("nnUNetTrainer", ""), style)
    upper = [r["foreground_dice"] for r in cells.get((BASELINE, ALL_LABELS), {}).values()]
    if upper:
        dice_ax.axhline(statistics.mean(upper), color="black", linestyle="--",
                        label=f"all labels (mean of {repeats_text(cells[(BASELINE, ALL_LABELS)])})")
    gain_ax.axhline(0, color="black", linewidth=0.8)
    for ax, ylabel in ((dice_ax, "mean foreground Dice (fold validation)"),
                       (gain_ax, f"paired difference to {BASELINE.replace('nnUNetTrainer', '')}")):
        if fractions:
            ax.set_xscale("log")
        ax.set_xticks([mean_labelled_cases(records, f) for f in fractions],
                      [f"{mean_labelled_cases(records, f):g}\n({f})" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labelled training cases (fraction)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    gain_ax.legend(*dice_ax.get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("small marks: each fold (and kind); large marks and lines: means over every repeat of the "
                 "fraction, drawn only for a trainer that ran them all", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_points_and_means(ax, records, fractions, values_of, cells, label: str, style: dict) -> None:
    """One trainer on one panel: ``values_of(fraction)`` (repeat -> value) as points, and the line of its
    complete means."""
    means = []
    for f in fractions:
        values = values_of(f)
        x = mean_labelled_cases(records, f) * style["shift"]
        ax.plot([x] * len(values), list(values.values()), linestyle="none", marker=style["marker"], markersize=4,
                alpha=0.5, color=style["color"])
        mean = complete_mean(values, fraction_repeats(cells, f))
        if mean is not None:
            means.append((x, mean))
    ax.plot(*zip(*means) if means else ([], []), label=label, markersize=7,
            **{k: style[k] for k in ("color", "marker", "linewidth")})


def plot_curves(record: dict, path: Path) -> None:
    curves = {k: [float("nan") if v is None else v for v in values] for k, values in record["curves"].items()}
    teacher = [k for k in curves if k.startswith(("teacher_confident_dice_", "teacher_coverage_"))
               and not k.endswith("_0")] + [KEPT_CURVE]  # the foreground classes (background stays near 1), and
    # the share of the unlabelled training pixels whose pseudo-label was kept
    panels = [("loss", ["train_losses", "val_losses"]), ("pseudo Dice", ["mean_fg_dice", "ema_fg_dice", "teacher_dice"]),
              ("loss terms", [k for k in curves if is_term_curve(k)]),
              ("teacher per foreground class:\nconfident Dice, share;\nkept share in training", teacher)]
    panels = [(title, [k for k in keys if k in curves and any(math.isfinite(v) for v in curves[k])])
              for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = pyplot().subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), dpi=100, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            ax.plot(range(len(curves[key])), curves[key], marker="o", label=key,
                    linestyle="--" if key.startswith("teacher_coverage_") else ":" if key == KEPT_CURVE else "-")
        for epoch, stage in enumerate(curves.get("stage", [])):
            ax.axvspan(epoch - 0.5, epoch + 0.5, color=f"C{int(stage) + 4}", alpha=0.15)
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"{record['trainer']}, labelled {record['fraction']}, fold {record['fold']}")
    axes[-1, 0].set_xlabel("epoch (shading: training stage)")
    fig.tight_layout()
    save_figure(fig, path)


def first_finetuning_dice(record: dict) -> Optional[Tuple[int, float]]:
    """(pretraining epochs, nnU-Net's pseudo Dice after the first fine-tuning epoch) of a run that pretrains;
    None for a run without pretraining epochs or a record older than the ``supervised`` curve."""
    supervised, dice = record["curves"].get(SUPERVISED_CURVE) or [], record["curves"]["mean_fg_dice"]
    first = next((epoch for epoch, value in enumerate(supervised) if value == 1), None)
    return (first, dice[first]) if first and dice[first] is not None else None


def starting_dice_section(records: Sequence[dict]) -> List[str]:
    """Did the pretraining change where fine-tuning starts? Each pretraining run's pseudo Dice after its first
    fine-tuning epoch beside the baseline's after its first epoch, on the same fraction, fold and kind."""
    names, cells, rows = kind_names(records), by_cell(records), []
    for r in sorted(records, key=lambda r: (r["trainer"], r["labelled_cases"], r["fold"])):
        start, repeat = first_finetuning_dice(r), repeat_of(r, names)
        baseline = cells.get((BASELINE, r["fraction"]), {}).get(repeat)
        base = baseline["curves"]["mean_fg_dice"][0] if baseline else None
        if start and base is not None:
            rows.append(table_row(r["trainer"], [r["fraction"], repeat_label(repeat), str(start[0]), f"{start[1]:.3f}",
                                                 f"{base:.3f}", f"{start[1] - base:+.3f}"]))
    if not rows:
        return []
    return ["Where fine-tuning starts: nnU-Net's pseudo Dice (validation batches) after the first fine-tuning epoch "
            f"of each run that pretrains, beside {BASELINE}'s after its first epoch (the same iterations of "
            "supervised training, with and without the pretraining before them):", "",
            table_row("method", ["fraction", "repeat", "pretraining epochs", "after its first fine-tuning epoch",
                                 f"{BASELINE} after its first epoch", "difference"]),
            "|---" * 7 + "|", *rows, ""]


def case_section(records: Sequence[dict]) -> List[str]:
    rows = case_rows(records)
    if not any(any(cell_text) for _, cell_text in rows):
        return []
    fractions = fraction_order(records)
    return [f"Per validation case, the method's Dice (mean over the classes of the case) minus {BASELINE}'s, on "
            "the same fraction and folds: mean, bootstrap 95 % interval (cases resampled within each fold; shown "
            f"from {MIN_CASES_FOR_INTERVAL} cases), cases improved and worsened. The interval covers which cases "
            "are validated on, not the run-to-run noise of training. Classes absent from a case weigh as much as "
            "present ones here, so this mean can differ from the difference of nnU-Net's means above.", "",
            table_row("method", fractions), "|---" * (len(fractions) + 1) + "|",
            *(table_row(trainer, cell_text) for trainer, cell_text in rows), ""]


def where_trained(record: dict) -> str:
    """nnU-Net's configuration and plans of a run (records from before they were kept: nnU-Net's defaults)."""
    return f"{record.get('configuration', DEFAULT_CONFIGURATION)} of {record.get('source_plans', DEFAULT_PLANS)}"


def section(group: Sequence[dict], digest: str, folder: Path) -> List[str]:
    """The section of one baseline: its runs and every method run that pairs with it, whatever settings of
    its own each method run adds (a row per trainer and setting)."""
    names = kind_names(group)
    for r in group:  # each work folder's own report draws its runs' curves
        if r["source"] == folder.parent:
            suffix = f"_{names[kind(r)]}" if names else ""
            plot_curves(r, folder / "curves" / r["plans"] / f"{r['trainer']}_fold{r['fold']}{suffix}.png")
    reported, repeated = shared_baseline(group, digest)
    records = with_setting_labels(reported)
    first = records[0]
    plot = folder / f"dice_vs_labels_{digest}_seed{first['split_seed']}_{first['device']}.png"
    plot_dice(records, plot)
    env = first["environment"]
    # the processor kind matters: a seeded run repeats on one kind, not across kinds (docs/BENCHMARKS.md)
    machines = sorted({", ".join(filter(None, (r["environment"]["machine"], r["environment"].get("cpu"))))
                       for r in records})
    kinds = (["Processor kinds (a method is paired with the baseline only on the same fold and kind): "
              + "; ".join(f"{short} = {name}" for name, short in names.items()) + ".", ""] if names else [])
    commits = sorted({r["environment"]["commit"] or r["environment"]["nnunet_contrast"] for r in records})
    validation = sorted({(r["fold"], r["validation_cases"]) for r in records})
    budgets = sorted({(r["budget_digest"], " ".join(r["budget_set"]) or "none") for r in records})
    return [f"## Budget `{first['budget_preset']}` (digest {digest}), {where_trained(first)}, split seed "
            f"{first['split_seed']}, device {first['device']}", "",
            "Extra settings (per plans digest; the baseline trains without those of the self-training and method "
            "sections, which it ignores): " + "; ".join(f"{d}: {text}" for d, text in budgets) + ". "
            f"Machine(s): {'; '.join(machines)}; "
            f"torch {env['torch']}, nnunetv2 {env['nnunetv2']}, nnunet-contrast {', '.join(commits)}. Runs "
            f"finished between {min(r['environment']['date'] for r in records)} and "
            f"{max(r['environment']['date'] for r in records)}. Scores: nnU-Net's validation of each fold ("
            + ", ".join(f"fold {fold}: {n} cases" for fold, n in validation) + ").", "", *kinds,
            f"Mean foreground Dice (over {'repeats: rows with other repeats do not compare, the paired tables do' if names else 'folds'}):", "", *dice_table(records), "",
            f"Difference to {BASELINE} on the same fraction and {'fold and kind' if names else 'fold'} (mean ± "
            f"standard deviation over {'repeats' if names else 'folds'}: each one's):", "", *delta_table(records), "",
            *gap_table(records), *fold_table(records), *kind_spread_table(records), *case_section(records),
            *starting_dice_section(records), *baseline_repeats_section(repeated, reported),
            f"![Dice against labelled fraction]({plot.name})", "",
            "Cost:", "", *cost_table(records), ""]


def baseline_repeats_section(repeated: Sequence[dict], reported: Sequence[dict]) -> List[str]:
    """The baseline's (or recipe's) runs of other plans digests beside the one reported: the same training,
    since the settings those digests add are ones it ignores."""
    if not repeated:
        return []
    names = kind_names([*repeated, *reported])
    key = lambda r: (r["trainer"], r["fraction"], *repeat_of(r, names))  # noqa: E731
    shown = {key(r): r for r in reported}
    rows = [table_row(r["trainer"], [r["fraction"], repeat_label(key(r)[2:]), r["budget_digest"],
                                     f"{r['foreground_dice']:.7f}", f"{shown[key(r)]['foreground_dice']:.7f}"])
            for r in sorted(repeated, key=key)]
    return ["The same baseline run trained again under other plans digests (before the benchmark shared it): "
            "the settings those add are ones it ignores, so a seeded run repeats on one kind:", "",
            table_row("trainer", ["fraction", "repeat", "plans digest", "Dice", "Dice of the run reported"]),
            "|---" * 6 + "|", *rows, ""]


def write_report(workdir: Path, also: Iterable[Path] = ()) -> Path:
    """``workdir``/report/report.md from the records of ``workdir`` and of the work folders ``also``."""
    records = report_records(workdir, also)
    if not records:
        raise UserInputError(f"no finished runs in {Path(workdir) / 'results'}: run 'nnunet-contrast benchmark' "
                             f"with this --workdir first")
    folder = Path(workdir) / "report"
    lines = ["# nnunet-contrast benchmark report", "",
             "Generated by `nnunet-contrast report` from the result files of this work folder"
             + "".join(f", of {Path(a).name}" for a in also) + ".", ""]
    for (digest, _, _), group in sorted(group_records(records).items()):
        lines += section(group, digest, folder)
    path = folder / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
