"""The benchmark's planning, resume and aggregation on a fake runner: no training here.

The fake runner stands in for nnU-Net's and our commands: it writes the files each real command
leaves behind (split file, plans file, a fold's validation summary, settings and final checkpoint)
with made-up scores, so the logic around the commands is tested, not nnU-Net.
"""
import contextlib
import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from nnunet_contrast.commands.benchmark.records import environment, load_records, seconds_per_iteration
from nnunet_contrast.commands.benchmark import runs
from nnunet_contrast.commands.benchmark.report import (by_cell, case_difference, case_rows, complete_mean, delta_table,
                                              dice_table, first_finetuning_dice, fraction_repeats, group_records, interval_text,
                                              setting_labels, style_indices, trainer_style, write_report)
from nnunet_contrast.commands.benchmark.runs import (ALL_LABELS, BASELINE, Benchmark, Budget, Run, execute, subprocess_runner,
                                            wall_time)
from nnunet_contrast.commands.cli import main
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.data.split import make_split

TRAINERS = [BASELINE, "nnUNetTrainerCrossLevel"]
PRETRAINING = ("nnUNetTrainerGlobalLocalContrast",)  # the fake trainers that save checkpoint_pretrained.pth
NNUNET_FOLDS = [{"train": [f"case_{i:03d}" for i in range(40) if i % 5 != f], "val": [f"case_{i:03d}" for i in
                                                                                       range(40) if i % 5 == f]}
                for f in range(5)]


def fake_dice(trainer: str, fraction: str, fold: int) -> float:
    """The method gains 0.02 on fold 0 and 0.04 on fold 1 over the baseline: paired differences differ."""
    gain = 0.0 if trainer == BASELINE else 0.02 * (fold + 1)
    return round(0.5 + 0.4 * float(fraction) + 0.01 * fold + gain, 6)


class FakeRunner:
    """Writes what each command would write; ``stop_training`` makes the next training stop part-way."""

    def __init__(self, benchmark: Benchmark):
        self.benchmark, self.commands, self.stop_training, self.settings = benchmark, [], None, {}
        self.env = {}

    def __call__(self, command, env, log):
        self.commands.append(command)
        self.env = env
        handler = {"nnUNetv2_convert_MSD_dataset": self.convert, "split": self.split, "plans": self.plans,
                   "nnUNetv2_train": self.train}.get(command[0] if command[0] != "nnunet-contrast" else command[1])
        if handler:
            handler(command)

    def convert(self, command):
        images = self.benchmark.workdir / "nnUNet_raw" / self.benchmark.dataset / "imagesTs"
        images.mkdir(parents=True)
        for name in ["hippocampus_118_0000.nii.gz", "hippocampus_200_0000.nii.gz"]:
            (images / name).write_bytes(b"")

    def split(self, command):
        labeled = command[command.index("--labeled") + 1]
        path = self.benchmark.preprocessed / command[command.index("--name") + 1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(make_split(NNUNET_FOLDS, float(labeled), 0)))

    def plans(self, command):
        name = command[command.index("-o") + 1]
        (self.benchmark.preprocessed / f"{name}.json").write_text("{}")
        self.settings[name] = {}  # the self-training and method sections a --set names
        for key, value in (command[i + 1].split("=", 1) for i, word in enumerate(command) if word == "--set"):
            _, section, field = key.split(".", 2) if key.count(".") == 2 else (None, None, None)
            if section not in (None, "budget", "semisup", "run"):
                self.settings[name].setdefault(section, {})[field] = value

    def train(self, command):
        trainer, plans, fold = command[command.index("-tr") + 1], command[command.index("-p") + 1], int(command[3])
        fraction = plans.rsplit("_l", 1)[1]
        folder = self.benchmark.fold_folder(Run(trainer, fraction, fold))
        if "nnUNet_results" in self.env:  # where nnU-Net writes: the results folder of its environment
            folder = Path(self.env["nnUNet_results"]) / folder.relative_to(self.benchmark.results_root(Run(trainer, fraction, fold)))
        if "-pretrained_weights" in command:
            assert Path(command[command.index("-pretrained_weights") + 1]).is_file() and "--c" not in command
        (folder / "validation").mkdir(parents=True, exist_ok=True)
        if self.stop_training == "in pretraining":
            self.stop_training = None
            torch.save({"logging": {}}, folder / "checkpoint_latest.pth")
            raise UserInputError("stopped in the pretraining")
        if trainer in PRETRAINING:  # saved as the fine-tuning starts
            torch.save({"network_weights": {}}, folder / "checkpoint_pretrained.pth")
        logging = {"epoch_start_timestamps": [0.0, 100.0, 200.0], "epoch_end_timestamps": [50.0, 120.0, 230.0],
                   "train_losses": [1.0, 0.5, 0.2], "val_losses": [0.9, 0.6, 0.4], "mean_fg_dice": [0.3, 0.6, 0.7],
                   "ema_fg_dice": [0.03, 0.09, 0.15], "stage": [0, 1, 1], "cross_level_contrast_loss": [2.0, 1.0, float("nan")], "lrs": [0.1, 0.1, 0.1],
                   "teacher_coverage_1": [float("nan"), 0.9, 0.8], "teacher_kept_share": [float("nan"), 0.97, 0.95]}
        if trainer != BASELINE:  # a pretraining epoch, then fine-tuning (LabeledOnly logs no stages)
            logging["supervised"] = [0.0, 1.0, 1.0]
        torch.save({"logging": logging}, folder / "checkpoint_latest.pth")
        if self.stop_training == "in training":
            self.stop_training = None
            raise UserInputError("stopped part-way")
        torch.save({"logging": logging}, folder / "checkpoint_final.pth")
        (folder / "checkpoint_latest.pth").unlink()  # as nnU-Net does before its final validation
        split_file = self.benchmark.split_name(fraction)
        (folder / "nnunet_contrast_settings.json").write_text(json.dumps(
            {"budget": {"num_iterations_per_epoch": 10}, "semisup": {"split_file": split_file}, "run": {"seed": 0},
             **self.settings.get(plans, {})}))
        if self.stop_training == "in validation":
            self.stop_training = None
            raise UserInputError("stopped in the final validation")
        dice = fake_dice(trainer, fraction, fold)
        summary = {"foreground_mean": {"Dice": dice}, "mean": {"1": {"Dice": dice + 0.01}, "2": {"Dice": dice - 0.01}},
                   "metric_per_case": [fake_case(k, dice, trainer) for k in range(8)]}
        if trainer != BASELINE:
            summary["metric_per_case"].reverse()  # cases are paired by name, not by position
        (folder / "validation" / "summary.json").write_text(json.dumps(summary))


def fake_case(k: int, dice: float, trainer: str) -> dict:
    """Classes absent from the reference (nnU-Net's NaN where the prediction has none either): in case 5
    class 2 is absent and only the method predicts none of it (the baseline's Dice 0); in case 6 neither
    predicts it; case 7 has no class and neither prediction has one."""
    nan = float("nan")
    values = {5: (dice + 0.01, 0.0 if trainer == BASELINE else nan), 6: (dice + 0.01, nan), 7: (nan, nan)}
    class_1, class_2 = values.get(k, (dice + 0.01, dice - 0.01))
    return {"reference_file": f"gt_segmentations/case_{k:03d}.nii.gz", "metrics": {"1": {"Dice": class_1}, "2": {"Dice": class_2}}}


def refuse(*args):
    raise AssertionError("a dry run ran a command")


@pytest.fixture()
def msd(tmp_path):
    """An MSD task folder of 40 training cases (nnU-Net's 5 folds then train on 32 each): one test scan
    has a label (held out), one has none (unlabelled)."""
    folder = tmp_path / "Task04_Hippocampus"
    (folder / "imagesTr").mkdir(parents=True)
    for i in range(40):
        (folder / "imagesTr" / f"case_{i:03d}.nii.gz").write_bytes(b"")
    for sub, name in [("imagesTs", "hippocampus_118.nii.gz"), ("imagesTs", "hippocampus_200.nii.gz"),
                      ("labelsTs", "hippocampus_200.nii.gz")]:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_bytes(b"")
    return folder


def make_benchmark(tmp_path, msd, **kwargs) -> Benchmark:
    options = dict(trainers=TRAINERS, fractions=["0.05", "0.2"], folds=[0, 1])
    options.update(kwargs)
    return Benchmark(tmp_path / "work", msd, **options)


def train_commands(commands):
    return [c for c in commands if c[0] == "nnUNetv2_train"]


def test_runs_cover_fractions_folds_trainers_and_the_upper_bound(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, trainers=["nnUNetTrainerCrossLevel", BASELINE])
    runs = benchmark.runs()
    assert len(runs) == 2 * 2 * 2 + 2
    assert runs[:2] == [Run(BASELINE, ALL_LABELS, 0), Run(BASELINE, ALL_LABELS, 1)]
    assert runs[2] == Run(BASELINE, "0.05", 0)  # the baseline first in each cell
    assert len(make_benchmark(tmp_path, msd, upper_bound=False).runs()) == 8


def test_dry_run_lists_every_command_and_runs_nothing(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd)
    printed = []
    count = execute(benchmark.steps(), {}, runner=refuse, dry_run=True, out=printed.append)
    trains = [line for line in printed if line.startswith("$ nnUNetv2_train")]
    assert len(trains) == len(benchmark.runs()) == 10 and count == len(printed)
    assert any("--labeled 0.05" in line and "--seed 0" in line for line in printed)
    assert any(line.startswith("$ nnunet-contrast add-unlabeled") for line in printed)
    assert not benchmark.workdir.exists()


def test_a_second_call_skips_finished_runs(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd)
    runner = FakeRunner(benchmark)
    execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
    assert len(train_commands(runner.commands)) == 10
    assert sorted(p.name for p in (benchmark.workdir / "unlabeled").iterdir()) == ["hippocampus_118_0000.nii.gz"]
    assert len(load_records(benchmark.workdir)) == 10
    again = FakeRunner(benchmark)
    assert execute(benchmark.steps(), {}, runner=again, out=lambda line: None) == 0 and again.commands == []
    bigger = make_benchmark(tmp_path, msd, folds=[0, 1, 2])  # a new fold: only its runs are trained
    more = FakeRunner(bigger)
    execute(bigger.steps(), {}, runner=more, out=lambda line: None)
    assert {c[3] for c in train_commands(more.commands)} == {"2"} and len(train_commands(more.commands)) == 5


def test_records_copied_into_a_new_work_folder_are_not_trained_again_but_the_recipes_baseline_is(tmp_path, msd):
    first = make_benchmark(tmp_path, msd, trainers=[BASELINE], fractions=["0.2"], folds=[1], upper_bound=False)
    execute(first.steps(), {}, runner=FakeRunner(first), out=lambda line: None)
    moved = make_benchmark(tmp_path / "new", msd, fractions=["0.2"], folds=[1], upper_bound=False)
    shutil.copytree(first.workdir / "results", moved.workdir / "results")
    runner = FakeRunner(moved)
    execute(moved.steps(), {}, runner=runner, out=lambda line: None)
    assert {c[c.index("-tr") + 1] for c in train_commands(runner.commands)} == set(TRAINERS) - {BASELINE}
    recipe = make_benchmark(tmp_path / "recipe", msd, trainers=[BASELINE], fractions=["0.2"], folds=[1],
                            upper_bound=False, with_recipe=True)
    shutil.copytree(first.workdir / "results", recipe.workdir / "results")
    printed = []
    execute(recipe.steps(), {}, runner=refuse, dry_run=True, out=printed.append)
    assert any(line.startswith("$ nnUNetv2_train") and BASELINE in line for line in printed)


def test_a_record_of_another_processor_kind_is_refused_before_anything_runs(tmp_path, msd):
    first = make_benchmark(tmp_path, msd, trainers=[BASELINE], fractions=["0.2"], folds=[1], upper_bound=False)
    execute(first.steps(), {}, runner=FakeRunner(first), out=lambda line: None)
    path = first.record_path(Run(BASELINE, "0.2", 1))
    record = json.loads(path.read_text())
    record["environment"]["cpu"] = "AMD EPYC 7B13, torch kernels AVX2"
    path.write_text(json.dumps(record))
    again = make_benchmark(tmp_path, msd, fractions=["0.2"], folds=[1], upper_bound=False)
    with pytest.raises(UserInputError, match=r"was recorded on another processor kind \(AMD EPYC 7B13, torch kernels "
                                             r"AVX2; this machine: .*\): benchmark this kind in a work folder of its own"):
        again.steps()
    assert json.loads(path.read_text()) == record


@pytest.mark.parametrize("where", ["in training", "in validation"])
def test_a_stopped_training_continues_with_c_and_is_recorded_once(tmp_path, msd, where):
    benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[0], upper_bound=False)
    runner = FakeRunner(benchmark)
    runner.stop_training = where
    with pytest.raises(UserInputError):
        execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
    assert load_records(benchmark.workdir) == []
    resumed = FakeRunner(benchmark)
    execute(benchmark.steps(), {}, runner=resumed, out=lambda line: None)
    trains = train_commands(resumed.commands)
    assert trains[0][-1] == "--c" and trains[0][trains[0].index("-tr") + 1] == BASELINE
    assert "--c" not in trains[1]
    assert not any(c[0] == "nnUNetv2_convert_MSD_dataset" or "split" in c for c in resumed.commands)


PAIR = "nnUNetTrainerPseudoLabelContrast@nnUNetTrainerGlobalLocalContrast"
PAIR_ST = "nnUNetTrainerPseudoLabelContrastSelfTraining@nnUNetTrainerGlobalLocalContrast"


def test_rows_from_another_trainers_pretraining_train_it_once_in_a_results_folder_of_their_own(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, trainers=["nnUNetTrainerPseudoLabelContrast", PAIR, PAIR_ST],
                               fractions=["0.05"], folds=[0], upper_bound=False)
    printed = []
    execute(benchmark.steps(), {}, runner=refuse, dry_run=True, out=printed.append)
    root = benchmark.workdir / "pretrained" / "nnUNetTrainerGlobalLocalContrast"
    assert sum(line.startswith(f"$ nnUNet_results={root} nnUNetv2_train") for line in printed) == 4
    assert not benchmark.workdir.exists()
    runner = FakeRunner(benchmark)
    execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
    run = Run(PAIR, "0.05", 0)
    source = benchmark.fold_folder(run, "nnUNetTrainerGlobalLocalContrast")
    trains = [(c[c.index("-tr") + 1], c[-2:]) for c in train_commands(runner.commands)]
    weights = ["-pretrained_weights", str(source / "checkpoint_pretrained.pth")]
    assert trains[1:] == [("nnUNetTrainerPseudoLabelContrast", ["-device", "cpu"]),
                          ("nnUNetTrainerGlobalLocalContrast", ["-device", "cpu"]),  # once for both rows
                          ("nnUNetTrainerPseudoLabelContrast", weights),
                          ("nnUNetTrainerPseudoLabelContrastSelfTraining", weights)]
    assert source.is_relative_to(root)
    own = benchmark.fold_folder(Run("nnUNetTrainerPseudoLabelContrast", "0.05", 0))
    assert benchmark.fold_folder(run) != own and (own / "validation").is_dir()  # TARGET's own row stays apart
    records = {r["trainer"]: r for r in load_records(benchmark.workdir)}
    assert set(records) == {BASELINE, "nnUNetTrainerPseudoLabelContrast", PAIR, PAIR_ST}
    assert "source_wall_seconds" in records[PAIR] and "source_wall_seconds" not in records[BASELINE]
    assert f"| {PAIR} |" in write_report(benchmark.workdir).read_text()


def test_a_stopped_row_from_a_pretraining_continues_with_c_and_without_the_weights(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, trainers=[PAIR], fractions=["0.05"], folds=[0], upper_bound=False)
    execute(benchmark.steps()[:-3], {}, runner=FakeRunner(benchmark), out=lambda line: None)  # the baseline
    trained = []
    # the source before and after its pretraining, the target, then no stop
    for stop in ("in pretraining", "in training", "in training", None):
        runner = FakeRunner(benchmark)
        runner.stop_training = stop
        with pytest.raises(UserInputError) if stop else contextlib.nullcontext():
            execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
        trained += [(c[c.index("-tr") + 1], c[-2:]) for c in train_commands(runner.commands)]
    weights = ["-pretrained_weights", str(benchmark.fold_folder(Run(PAIR, "0.05", 0), "nnUNetTrainerGlobalLocalContrast")
                                          / "checkpoint_pretrained.pth")]
    assert trained == [("nnUNetTrainerGlobalLocalContrast", ["-device", "cpu"]),
                       ("nnUNetTrainerGlobalLocalContrast", ["cpu", "--c"]),  # stopped once it had pretrained
                       ("nnUNetTrainerPseudoLabelContrast", weights), ("nnUNetTrainerPseudoLabelContrast", ["cpu", "--c"])]
    assert [r["trainer"] for r in load_records(benchmark.workdir) if r["trainer"] != BASELINE] == [PAIR]


def test_a_row_from_a_trainer_without_pretraining_says_so(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, trainers=["nnUNetTrainerPseudoLabelContrast@nnUNetTrainerCrossLevel"],
                               fractions=["0.05"], folds=[0], upper_bound=False)
    with pytest.raises(UserInputError, match=r"^nnUNetTrainerCrossLevel saved no checkpoint_pretrained.pth: its schedule "
                                             r"has no pretraining stage .*; after '@' name a trainer that pretrains"):
        execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)


def test_records_hold_scores_split_and_cost(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[1], upper_bound=False)
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    record = next(r for r in load_records(benchmark.workdir) if r["trainer"] == BASELINE)
    assert record["foreground_dice"] == fake_dice(BASELINE, "0.05", 1)
    assert record["labelled_cases"] == 2 and record["unlabelled_cases"] == 30 and record["fold"] == 1
    assert record["budget_digest"] == benchmark.budget.digest and record["validation_cases"] == 8
    assert record["training_seconds"] == 50 + 20 + 30 and record["seconds_per_iteration"] == pytest.approx(2.5)
    assert record["wall_seconds"] is None and record["stopped_calls"] == 0  # the fake runner writes no wall times
    assert record["curves"]["cross_level_contrast_loss"] == [2.0, 1.0, None]  # JSON has no NaN
    assert record["curves"]["teacher_coverage_1"] == [None, 0.9, 0.8]  # the teacher's per-class quality too
    assert record["curves"]["teacher_kept_share"] == [None, 0.97, 0.95]  # and the share of its labels kept
    assert "lrs" not in record["curves"]
    rows = list(csv.DictReader(open(benchmark.workdir / "results.csv")))
    assert len(rows) == 2 and {r["trainer"] for r in rows} == set(TRAINERS)


def test_records_hold_each_validation_case_dice_per_class(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[0], upper_bound=False)
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    record = next(r for r in load_records(benchmark.workdir) if r["trainer"] == BASELINE)
    dice = fake_dice(BASELINE, "0.05", 0)
    cases = record["case_dice"]
    assert len(cases) == 8 and cases["case_000.nii.gz"] == {"1": pytest.approx(dice + 0.01),
                                                            "2": pytest.approx(dice - 0.01)}
    assert cases["case_005.nii.gz"]["2"] == 0.0 and cases["case_007.nii.gz"] == {"1": None, "2": None}


def test_a_second_benchmark_in_the_same_work_folder_is_refused(tmp_path, msd, capsys):
    benchmark = make_benchmark(tmp_path, msd)
    with benchmark.lock():
        code = main(["benchmark", "--workdir", str(benchmark.workdir), "--msd", str(msd), "--trainers", BASELINE])
    error = capsys.readouterr().err
    assert code == 2 and "another 'nnunet-contrast benchmark'" in error and error.count("\n") == 1
    assert list(benchmark.workdir.iterdir()) == [benchmark.workdir / ".benchmark.lock"]
    with benchmark.lock():  # released
        pass


def test_the_command_trains_under_the_lock(tmp_path, msd, monkeypatch):
    benchmark = make_benchmark(tmp_path, msd, trainers=[BASELINE], fractions=["0.05"], folds=[0])
    fake = FakeRunner(benchmark)

    def runner(command, env, log, keep_fds=()):
        assert len(keep_fds) == 1  # the training commands inherit the lock
        with pytest.raises(UserInputError, match="another"):
            with benchmark.lock():
                pass
        fake(command, env, log)

    monkeypatch.setattr(runs, "subprocess_runner", runner)
    arguments = ["benchmark", "--workdir", str(benchmark.workdir), "--msd", str(msd), "--trainers", BASELINE,
                 "--fractions", "0.05", "--folds", "0"]
    assert main(arguments) == 0 and len(train_commands(fake.commands)) == 2
    assert benchmark.record_path(Run(BASELINE, "0.05", 0)).is_file()


def test_wall_time_counts_ended_calls_and_names_killed_ones(tmp_path):
    log = tmp_path / "logs" / "run.log"
    subprocess_runner(["python", "-c", "pass"], dict(os.environ), log)
    assert log.with_suffix(".wall").read_text().split()[0] == "start"
    seconds, stopped = wall_time(log)
    assert seconds is not None and seconds >= 0 and stopped == 0
    log.with_suffix(".wall").write_text("start\n100.0\nstart\nstart\n50.5\n")  # the second call was killed
    assert wall_time(log) == (150.5, 1)
    log.with_suffix(".wall").write_text("100.0\n50.0\n")  # written before calls marked their start
    assert wall_time(log) == (150.0, 0)
    assert wall_time(tmp_path / "none.log") == (None, 0)


def test_seconds_per_iteration_uses_the_last_stage():
    logging = {"epoch_start_timestamps": [0, 10, 30], "epoch_end_timestamps": [5, 20, 60], "stage": [0, 0, 1]}
    assert seconds_per_iteration(logging, 10) == 3.0
    del logging["stage"]  # nnU-Net's own logger: every epoch is one stage
    assert seconds_per_iteration(logging, 5) == pytest.approx((5 + 10 + 30) / 3 / 5)


def test_another_split_seed_trains_again_and_records_its_own_split(tmp_path, msd):
    for seed in (0, 1):
        benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[0], upper_bound=False, seed=seed)
        runner = FakeRunner(benchmark)
        execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
        assert len(train_commands(runner.commands)) == 2
    records = load_records(tmp_path / "work")
    assert len(group_records(records)) == 2
    for record in records:
        split = json.loads((benchmark.preprocessed / record["split_file"]).read_text())
        assert f"seed{record['split_seed']}" in record["split_file"] and f"_s{record['split_seed']}_" in record["plans"]
        assert record["labelled_cases"] == len(split["folds"][0]["labeled"])


def test_fractions_are_normalised_and_the_baseline_always_runs(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, trainers=["nnUNetTrainerCrossLevel"], fractions=["0.050", "0.05", "3"])
    assert benchmark.fractions == ["0.05", "3"] and benchmark.trainers == [BASELINE, "nnUNetTrainerCrossLevel"]
    with pytest.raises(UserInputError, match="upper bound"):
        make_benchmark(tmp_path, msd, fractions=["1.0"])
    with pytest.raises(UserInputError, match="folds"):
        make_benchmark(tmp_path, msd, folds=[-1])


def test_budgets_never_share_plans_or_tables(tmp_path, msd):
    default, other = Budget("benchmark_cpu"), Budget("benchmark_cpu", ("batch_size=8",))
    assert default.plans_identifier("0.05", 0) != other.plans_identifier("0.05", 0)
    assert default.digest == Budget("benchmark_cpu").digest
    for budget in (default, other):
        benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[0], budget=budget, upper_bound=False)
        execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    records = load_records(tmp_path / "work")
    assert len(records) == 4 and len(group_records(records)) == 2
    report = write_report(tmp_path / "work").read_text()
    assert report.count("## Budget") == 2


def test_a_3d_benchmark_on_resenc_plans_prepares_and_trains_its_own_configuration(tmp_path, msd):
    budget = Budget("benchmark_cpu", ("nnunet_contrast.selftraining.ema_decay=0.99",), "3d_fullres",
                    "nnUNetResEncUNetMPlans")
    benchmark = make_benchmark(tmp_path, msd, trainers=["nnUNetTrainerSelfTraining"], fractions=["0.05"], folds=[0],
                               budget=budget, upper_bound=False)
    runner = FakeRunner(benchmark)
    execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
    by_tool = {(c[0] if c[0] != "nnunet-contrast" else c[1]): c for c in runner.commands}
    assert "-pl nnUNetPlannerResEncM -c 3d_fullres" in " ".join(by_tool["nnUNetv2_plan_and_preprocess"])
    for tool in ("add-unlabeled", "plans"):
        assert "-p nnUNetResEncUNetMPlans -c 3d_fullres" in " ".join(by_tool[tool]), tool
    assert all(c[2] == "3d_fullres" for c in train_commands(runner.commands)) and len(train_commands(runner.commands)) == 2
    assert benchmark.fold_folder(Run(BASELINE, "0.05", 0)).parent.name.endswith("__3d_fullres")
    records = load_records(benchmark.workdir)
    assert {(r["configuration"], r["source_plans"]) for r in records} == {("3d_fullres", "nnUNetResEncUNetMPlans")}
    assert "3d_fullres of nnUNetResEncUNetMPlans" in write_report(benchmark.workdir).read_text()
    # its own plans files and digests; nnU-Net's defaults keep the digest of before (old records pair by it)
    digests = {b.digest for b in (budget.for_baseline(), Budget("benchmark_cpu"),
                                  Budget("benchmark_cpu", (), "3d_fullres"), Budget("benchmark_cpu", (), "2d", "x"))}
    assert len(digests) == 4
    assert Budget("benchmark_cpu").digest == "f9c7e9fe"  # the 2D records' budget since issue 26


def test_msd_benchmarks_plan_with_the_planners_they_know(tmp_path, msd, capsys):
    work = tmp_path / "work"
    code = main(["benchmark", "--workdir", str(work), "--msd", str(msd), "-p", "MyPlans"])
    error = capsys.readouterr().err
    assert code == 2 and "--plans MyPlans: with --msd the plans are one of nnUNetPlans" in error and not work.exists()


def test_the_baseline_trains_once_for_every_self_training_or_method_setting(tmp_path, msd):
    assert runs.baseline_reads("batch_dice=true") and runs.baseline_reads("nnunet_contrast.budget.num_epochs=3")
    assert not runs.baseline_reads("nnunet_contrast.selftraining.ema_decay=0.9")
    assert not runs.baseline_reads("nnunet_contrast.crosslevel.lambda_cont=1")
    trained = []
    for value in ("0.9", "0.99"):
        budget = Budget("benchmark_cpu", ("nnunet_contrast.budget.num_epochs=3",
                                          f"nnunet_contrast.selftraining.ema_decay={value}"))
        benchmark = make_benchmark(tmp_path, msd, trainers=[BASELINE, "nnUNetTrainerSelfTraining"],
                                   fractions=["0.05"], folds=[0], budget=budget)
        runner = FakeRunner(benchmark)
        execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
        trained.append([(c[c.index("-tr") + 1], c[c.index("-p") + 1]) for c in train_commands(runner.commands)])
    shared = Budget("benchmark_cpu", ("nnunet_contrast.budget.num_epochs=3",))
    first, second = trained
    assert first[:2] == [(BASELINE, shared.plans_identifier("1.0", 0, 0)), (BASELINE, shared.plans_identifier("0.05", 0, 0))]
    assert first[2][0] == "nnUNetTrainerSelfTraining" and first[2][1] != shared.plans_identifier("0.05", 0, 0)
    assert [t for t, _ in second] == ["nnUNetTrainerSelfTraining"]  # the baseline and upper bound were done
    records = load_records(tmp_path / "work")
    assert {r["baseline_digest"] for r in records} == {shared.digest}
    assert len({r["budget_digest"] for r in records}) == 3
    report = write_report(tmp_path / "work").read_text()
    assert report.count("## Budget") == 1  # one baseline, both settings paired with it, a row each
    delta = report.split("Difference to")[1].split("Share of the gap")[0]
    rows = [line for line in delta.splitlines() if line.startswith("| nnUNetTrainerSelfTraining")]
    assert len(rows) == 2 and all("| +" in row for row in rows)
    assert sum("(selftraining.ema_decay=" in row for row in rows) == 1  # the other runs as the first did


def test_setting_labels_name_what_a_run_changes_and_skip_what_older_code_did_not_record():
    runs = [{"settings": {"selftraining": {"threshold": "fixed"}}, "budget_set": []},  # older code: no gate
            {"settings": {"selftraining": {"threshold": "fixed", "gate": 0.7}},
             "budget_set": ["nnunet_contrast.budget.num_epochs=3", "nnunet_contrast.selftraining.gate=0.7"]},
            {"settings": {"selftraining": {"threshold": "self_adaptive", "gate": 0.0}},
             "budget_set": ["nnunet_contrast.selftraining.threshold=self_adaptive"]}]
    assert setting_labels(runs) == ["", "selftraining.gate=0.7", "selftraining.threshold=self_adaptive"]
    assert setting_labels(runs[:1] * 2) == ["", ""]


def test_records_from_before_the_shared_baseline_pair_with_it_and_their_baseline_is_a_repeat(tmp_path, msd):
    shared = Budget("benchmark_cpu")
    benchmark = make_benchmark(tmp_path, msd, trainers=[BASELINE], fractions=["0.05"], folds=[0], upper_bound=False)
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    old = make_benchmark(tmp_path, msd, trainers=[BASELINE, "nnUNetTrainerSelfTraining"], fractions=["0.05"],
                         folds=[0], upper_bound=False,
                         budget=Budget("benchmark_cpu", ("nnunet_contrast.selftraining.ema_decay=0.9",)))
    old.budget_of = lambda run: old.budget  # as an older benchmark did: every run, the baseline too, in its budget
    execute(old.steps(), {}, runner=FakeRunner(old), out=lambda line: None)
    for path in (tmp_path / "work" / "results").glob("*/*.json"):
        record = json.loads(path.read_text())
        del record["baseline_digest"]
        path.write_text(json.dumps(record))
    records = load_records(tmp_path / "work")
    assert len(records) == 3 and list(group_records(records)) == [(shared.digest, 0, "cpu")]
    report = write_report(tmp_path / "work").read_text()
    repeats = report.split("trained again under other plans digests")[1]
    assert f"| {BASELINE} | 0.05 | f0 | {old.budget.digest} | 0.5200000 | 0.5200000 |" in repeats
    assert "| nnUNetTrainerSelfTraining | +0.020 |" in report


def test_report_tables_mean_spread_and_paired_difference(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd)
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    records = load_records(benchmark.workdir)
    table = dice_table(records)
    baseline_row = next(line for line in table if line.startswith(f"| {BASELINE} "))
    # fraction 0.05: folds 0 and 1 score 0.52 and 0.53 -> mean 0.525, sd 0.007
    assert "0.525 ± 0.007 (n=2)" in baseline_row
    assert table[0] == "| method | 0.05 (2 labelled) | 0.2 (6 labelled) | all labels (32 labelled) |"
    assert table[-1].startswith("| nnU-Net, all labels") and table[-1].endswith("|  |  | 0.905 ± 0.007 (n=2) |")
    cross = next(line for line in delta_table(records) if "CrossLevel" in line)
    assert cross.count("+0.030 ± 0.014 (n=2): f0 +0.020, f1 +0.040") == 2  # fold-wise gains 0.02 and 0.04
    gaps = write_report(benchmark.workdir).read_text().split("Share of the gap")[1]
    gap_row = next(line for line in gaps.splitlines() if "CrossLevel" in line)
    # at 0.05: (0.54 - 0.52) / (0.90 - 0.52) in fold 0, (0.57 - 0.53) / (0.91 - 0.53) in fold 1
    shares = [0.02 / 0.38, 0.04 / 0.38]
    assert f"f0 {shares[0]:+.3f}, f1 {shares[1]:+.3f}" in gap_row
    report = write_report(benchmark.workdir)
    assert (report.parent / f"dice_vs_labels_{benchmark.budget.digest}_seed0_cpu.png").stat().st_size > 0
    curves = list((report.parent / "curves").glob("*/*.png"))
    assert len(curves) == 10
    # a fold missing for the baseline: the difference uses only the folds both have
    without = [r for r in records if not (r["trainer"] == BASELINE and r["fold"] == 1 and r["fraction"] == "0.05")]
    cross = next(line for line in delta_table(without) if "CrossLevel" in line)
    assert "| +0.020 |" in cross and cross.endswith("+0.030 ± 0.014 (n=2): f0 +0.020, f1 +0.040 |")


def test_the_plot_draws_a_mean_only_over_every_repeat_of_the_fraction(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"])
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    records = [r for r in load_records(benchmark.workdir)  # the method lacks fold 1
               if not (r["trainer"] == "nnUNetTrainerCrossLevel" and r["fold"] == 1)]
    cells = by_cell(records)
    repeats = fraction_repeats(cells, "0.05")
    assert repeats == {(0, ""), (1, "")}
    dice = lambda trainer: {k: r["foreground_dice"] for k, r in cells[(trainer, "0.05")].items()}  # noqa: E731
    assert complete_mean(dice(BASELINE), repeats) == pytest.approx((0.52 + 0.53) / 2)
    assert complete_mean(dice("nnUNetTrainerCrossLevel"), repeats) is None  # its point only, no mean of fold 0
    assert complete_mean({}, set()) is None


def test_each_plotted_trainer_has_its_own_colour_and_marker_and_its_own_place_beside_the_fraction():
    styles = [trainer_style(i, 22, f"nnUNetTrainer{i}") for i in range(22)]  # issue 28's report holds 22
    assert len({(s["color"], s["marker"]) for s in styles}) == 22
    shifts = [s["shift"] for s in styles]
    assert shifts == sorted(set(shifts)) and shifts[0] * shifts[-1] == pytest.approx(1)  # centred on the fraction
    assert 2 * shifts[-1] < 5 * shifts[0]  # the points at 2 and at 5 labelled cases do not overlap
    assert trainer_style(0, 22, BASELINE)["linewidth"] > styles[1]["linewidth"]


def test_a_trainer_keeps_its_plot_style_when_later_trainers_join():
    def record(trainer, date):
        return {"trainer": trainer, "upper_bound": False, "environment": {"date": date}}

    records = [record("nnUNetTrainerB", "2026-12-01T10:00:00"), record("nnUNetTrainerC", "2026-12-02T10:00:00"),
               record(BASELINE, "2026-12-03T10:00:00")]
    before = style_indices(records)
    assert before == {BASELINE: 0, "nnUNetTrainerB": 1, "nnUNetTrainerC": 2}
    after = style_indices(records + [record("nnUNetTrainerA", "2026-12-04T10:00:00")])  # first by name, last by date
    assert after == {**before, "nnUNetTrainerA": 3}


def test_the_report_says_where_fine_tuning_starts_after_pretraining(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[0])
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    section = write_report(benchmark.workdir).read_text().split("Where fine-tuning starts")[1]
    # the method's pseudo Dice after epoch 1 (its first fine-tuning epoch) against the baseline's after epoch 0
    assert "| nnUNetTrainerCrossLevel | 0.05 | f0 | 1 | 0.600 | 0.300 | +0.300 |" in section
    assert f"| {BASELINE} |" not in section.split("\n\n")[2]
    records = load_records(benchmark.workdir)
    assert first_finetuning_dice({"curves": {"mean_fg_dice": [0.5], "supervised": [1.0]}}) is None  # no pretraining
    assert first_finetuning_dice({"curves": {"mean_fg_dice": [0.5, 0.6]}}) is None  # a record before the curve
    assert [first_finetuning_dice(r) for r in records if r["trainer"] != BASELINE] == [(1, 0.6)]


def test_report_per_case_differences_pool_the_folds_with_a_bootstrap_interval(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, fractions=["0.05"])
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    records = load_records(benchmark.workdir)
    (trainer, (cell,)), = case_rows(records)
    # 7 scored cases per fold (case 7 has no class): gains 0.02 (fold 0) and 0.04 (fold 1) on every class,
    # and in case 5 the method's empty class 2 (right) against the baseline's false positive (Dice 0)
    expected = (6 * 0.02 + (0.02 + 1) / 2 + 6 * 0.04 + (0.04 + 1) / 2) / 14
    mean, low, high = re.fullmatch(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\], better 14 / worse 0 of 14 "
                                   r"cases \(2 folds\)", cell).groups()
    assert trainer == "nnUNetTrainerCrossLevel" and float(mean) == pytest.approx(expected, abs=5e-4)
    assert float(low) < float(mean) < float(high)
    assert "Per validation case" in write_report(benchmark.workdir).read_text()


def test_case_difference_and_interval_edge_cases():
    # an absent class the method rightly leaves empty (None) against the baseline's false positive (0.0)
    assert case_difference({"1": None, "2": 0.8}, {"1": 0.0, "2": 0.7}) == pytest.approx((1.0 + 0.1) / 2)
    assert case_difference({"1": None}, {"1": None}) is None
    assert interval_text({}) == ""
    assert interval_text({0: [0.1, -0.1, 0.0]}) == "+0.000, better 1 / worse 1 of 3 cases (1 fold)"  # too few
    assert interval_text({0: [0.01] * 12}) == "+0.010 [+0.010, +0.010], better 12 / worse 0 of 12 cases (1 fold)"


def test_a_report_of_the_upper_bound_alone(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, trainers=[BASELINE], fractions=["0.05"], folds=[0])
    steps = [s for s in benchmark.steps() if "0.05" not in s.describe]  # stopped after the upper bound
    execute(steps, {}, runner=FakeRunner(benchmark), out=lambda line: None)
    report = write_report(benchmark.workdir).read_text()
    assert "| method | all labels (32 labelled) |" in report and "(no method runs yet)" in report
    assert "Per validation case" not in report


def test_unlabelled_scans_are_the_test_scans_without_a_label(tmp_path, msd):
    assert [p.name for p in make_benchmark(tmp_path, msd).unlabeled_scans()] == ["hippocampus_118.nii.gz"]


@pytest.mark.parametrize("arguments, message", [
    (["--trainers", "nnUNetTrainerNope"], "nnUNetTrainerNope is not a trainer of this project"),
    (["--trainers", "nnUNetTrainerPseudoLabelContrast@nnUNetTrainerNope"], "nnUNetTrainerNope is not a trainer of"),
    (["--trainers", "nnUNetTrainerPseudoLabelContrast@"], "an empty name is not a trainer"),
    (["--trainers", "nnUNetTrainerIDEAL@nnUNetTrainerGlobalContrast"], "nnUNetTrainerIDEAL builds a network of its own"),
    (["--trainers", "nnUNetTrainerCrossLevel@nnUNetTrainerIDEALSelfTraining"], "nnUNetTrainerIDEALSelfTraining builds"),
    (["--trainers", "nnUNetTrainerGlobalContrast@nnUNetTrainerGlobalContrast"], "is TARGET@SOURCE, two different"),
    (["--trainers", "nnUNetTrainerCrossLevel@nnUNetTrainerIDEAL@nnUNetTrainerGlobalContrast"], "is TARGET@SOURCE"),
    (["--fractions", "1.5"], "outside (0, 1]"),
    (["--budget", "nope"], "not a preset of plans/"),
    (["--set", "nope"], "is not KEY=VALUE"),
    (["--fractions", "0.05", "1.0"], "is the upper bound"),
    (["--fractions", "500"], "--fractions 500: fold 0 of Dataset004_Hippocampus has 32 training cases"),
    (["--fractions", "2", "32", "--folds", "1"], "--fractions 32: fold 1 of Dataset004_Hippocampus has 32"),
    (["--folds", "0", "7"], "--folds 7: Dataset004_Hippocampus has folds 0 to 4 in nnU-Net's splits_final.json"),
    (["--folds", "-1"], "--folds -1: Dataset004_Hippocampus has folds 0 to 4"),
    (["--dry-run", "--folds", "7"], "--folds 7: "),
])
def test_bad_arguments_give_one_line_errors_and_write_nothing(tmp_path, msd, capsys, arguments, message):
    work = tmp_path / "work"
    code = main(["benchmark", "--workdir", str(work), "--msd", str(msd), *arguments])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
    assert not work.exists()


def test_msd_folder_must_exist_and_be_a_task(tmp_path, capsys):
    assert main(["benchmark", "--workdir", str(tmp_path / "w"), "--msd", str(tmp_path / "nope")]) == 2
    (tmp_path / "Hippocampus").mkdir()
    assert main(["benchmark", "--workdir", str(tmp_path / "w"), "--msd", str(tmp_path / "Hippocampus")]) == 2
    assert "TaskXX_Name" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_report_without_results_says_what_to_run(tmp_path, capsys):
    assert main(["report", "--workdir", str(tmp_path)]) == 2
    assert "run 'nnunet-contrast benchmark'" in capsys.readouterr().err


def benchmark_on_another_kind(tmp_path, msd, name: str, cpu: str, baseline_shift: float):
    """The same benchmark in work folder ``name``, its records rewritten as if trained on processor ``cpu``,
    a day later, with the baseline ``baseline_shift`` better: the floating-point difference of another kind."""
    benchmark = Benchmark(tmp_path / name, msd, trainers=TRAINERS, fractions=["0.05"], folds=[0, 1])
    execute(benchmark.steps(), {}, runner=FakeRunner(benchmark), out=lambda line: None)
    for path in (benchmark.workdir / "results").glob("*/*.json"):
        record = json.loads(path.read_text())
        record["environment"].update(cpu=cpu, date="2999-01-01T00:00:00")
        if record["trainer"] == BASELINE and not record["upper_bound"]:
            record["foreground_dice"] += baseline_shift
        path.write_text(json.dumps(record))
    return benchmark


def test_a_report_over_processor_kinds_pairs_each_run_within_its_kind(tmp_path, msd, capsys):
    here = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[0])
    execute(here.steps(), {}, runner=FakeRunner(here), out=lambda line: None)
    benchmark_on_another_kind(tmp_path, msd, "other", "Other CPU, torch kernels AVX2", baseline_shift=0.01)
    assert main(["report", "--workdir", str(here.workdir), "--also", str(tmp_path / "other")]) == 0
    report = (here.workdir / "report" / "report.md").read_text()
    assert f"K1 = {environment()['cpu']}; K2 = Other CPU, torch kernels AVX2" in report
    cross = next(line for line in report.split("Difference to")[1].splitlines() if "CrossLevel" in line)
    # fold 0 gains 0.02 on K1; on K2 the baseline is 0.01 better: 0.01; fold 1 (0.04) ran on K2 only
    assert "+0.020 ± 0.010 (n=3): f0/K1 +0.020, f0/K2 +0.010, f1/K2 +0.030" in cross
    by_fold = next(line for line in report.split("By fold")[1].splitlines() if "CrossLevel" in line)
    assert "(n=2): f0 +0.015, f1 +0.030; gap closed" in by_fold  # f0: (0.02 + 0.01) / 2
    spread = next(line for line in report.split("several processor kinds (floating")[1].splitlines()
                  if line.startswith(f"| {BASELINE} at 0.05"))
    assert "f0 0.0100 (2 kinds)" in spread and spread.endswith(f"| {0.01 / 2 ** 0.5:.4f} |")
    assert "(2 folds, 3 runs)" in report and "| f0/K2 |" in report
    curves = {p.name for p in (here.workdir / "report" / "curves").glob("*/*.png")}
    assert f"{BASELINE}_fold0_K1.png" in curves and not any("K2" in name for name in curves)  # the other's own
    assert "K1" not in write_report(tmp_path / "other").read_text()  # one kind alone: no kind names


def test_a_report_refuses_an_empty_also_folder_and_the_same_kind_twice(tmp_path, msd, capsys):
    here = make_benchmark(tmp_path, msd, fractions=["0.05"], folds=[0])
    execute(here.steps(), {}, runner=FakeRunner(here), out=lambda line: None)
    (tmp_path / "empty").mkdir()
    assert main(["report", "--workdir", str(here.workdir), "--also", str(tmp_path / "empty")]) == 2
    assert "--also" in capsys.readouterr().err and not (here.workdir / "report").exists()
    twin = make_benchmark(tmp_path / "twin", msd, fractions=["0.05"], folds=[0])
    execute(twin.steps(), {}, runner=FakeRunner(twin), out=lambda line: None)
    with pytest.raises(UserInputError, match="report each work folder of one processor kind once"):
        write_report(here.workdir, [twin.workdir])


# ----------------------------------------------------------------------------- the maintainers' recipe
class RecipeRunner(FakeRunner):
    """The fake runner, with nnU-Net's raw data of 40 cases, its predictions and its preprocessing."""

    def convert(self, command):
        super().convert(command)
        raw = self.benchmark.workdir / "nnUNet_raw" / self.benchmark.dataset
        for sub in ("imagesTr", "labelsTr"):
            (raw / sub).mkdir(parents=True)
        for i in range(40):
            (raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz").write_text(f"image {i}")
            (raw / "labelsTr" / f"case_{i:03d}.nii.gz").write_text(f"label {i}")
        (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "numTraining": 40}))
        self.benchmark.preprocessed.mkdir(parents=True, exist_ok=True)
        (self.benchmark.preprocessed / "splits_final.json").write_text(json.dumps(NNUNET_FOLDS))
        for name in ("dataset.json", "dataset_fingerprint.json"):
            (self.benchmark.preprocessed / name).write_text("{}")

    def collected(self, command):
        """nnUNetv2_predict: one 'prediction' per image case."""
        images, out = command[command.index("-i") + 1], command[command.index("-o") + 1]
        os.makedirs(out)
        for image in os.listdir(images):
            case = image[:-len("_0000.nii.gz")]
            with open(os.path.join(out, f"{case}.nii.gz"), "w") as f:
                f.write(f"prediction {case}")

    def __call__(self, command, env, log):
        if command[0] == "nnUNetv2_predict":
            self.commands.append(command)
            return self.collected(command)
        if command[0] == "nnUNetv2_train" and int(command[1]) >= 901:  # the recipe's second training
            self.commands.append(command)
            self.recipe_env = env
            return self.train_recipe(command)
        return super().__call__(command, env, log)

    def train_recipe(self, command):
        plans = command[command.index("-p") + 1]
        run = Run(runs.RECIPE, plans.rsplit("_l", 1)[1], self.recipe_fold)
        folder = self.benchmark.fold_folder(run)
        original = self.benchmark.fold_folder(Run(BASELINE, run.fraction, run.fold))
        folder.mkdir(parents=True)
        for name in ("checkpoint_final.pth", "nnunet_contrast_settings.json"):
            (folder / name).write_bytes((original / name).read_bytes())
        (folder / "validation").mkdir()
        summary = json.loads((original / "validation" / "summary.json").read_text())
        summary["foreground_mean"]["Dice"] += 0.005
        (folder / "validation" / "summary.json").write_text(json.dumps(summary))


def test_the_recipe_predicts_builds_a_dataset_and_trains_again(tmp_path, msd):
    benchmark = make_benchmark(tmp_path, msd, trainers=[BASELINE], fractions=["0.2"], folds=[1], upper_bound=False,
                               with_recipe=True)
    assert [r.trainer for r in benchmark.runs()] == [BASELINE, runs.RECIPE]
    runner = RecipeRunner(benchmark)
    runner.recipe_fold = 1
    printed = []
    execute(benchmark.steps(), {}, runner=runner, dry_run=True, out=printed.append)
    assert not (benchmark.workdir / "recipe").exists()  # a dry run registers no dataset
    execute(benchmark.steps(), {}, runner=runner, out=lambda line: None)
    predict = next(c for c in runner.commands if c[0] == "nnUNetv2_predict")
    assert predict[predict.index("-tr") + 1] == BASELINE and predict[predict.index("-f") + 1] == "1"
    split = json.loads((benchmark.preprocessed / benchmark.split_name("0.2")).read_text())["folds"][1]
    raw = benchmark.workdir / "recipe" / "nnUNet_raw" / "Dataset901_HippocampusRecipe"
    labels = {p.name[:-len(".nii.gz")]: p.read_text() for p in (raw / "labelsTr").iterdir()}
    for case in split["labeled"] + NNUNET_FOLDS[1]["val"]:
        assert labels[case] == f"label {case[-3:].lstrip('0') or '0'}"  # true labels
    for case in split["unlabeled"]:
        assert labels[case] == f"prediction {case}"  # never the hidden true label
    assert labels["hippocampus_118"] == "prediction hippocampus_118"  # the task's unlabelled scan
    preprocessed = raw.parent.parent / "nnUNet_preprocessed" / raw.name
    fold0 = json.loads((preprocessed / "splits_final.json").read_text())[0]
    assert fold0["val"] == sorted(NNUNET_FOLDS[1]["val"])
    assert sorted(fold0["train"]) == sorted(split["labeled"] + split["unlabeled"] + ["hippocampus_118"])
    train = [c for c in runner.commands if c[0] == "nnUNetv2_train"][-1]
    assert train[1:4] == ["901", "2d", "0"] and train[train.index("-tr") + 1] == BASELINE
    assert runner.recipe_env["nnUNet_results"] == str(benchmark.workdir / "recipe" / "nnUNet_results")
    records = {r["trainer"]: r for r in load_records(benchmark.workdir)}
    assert records[runs.RECIPE]["fold"] == 1
    assert records[runs.RECIPE]["foreground_dice"] == pytest.approx(records[BASELINE]["foreground_dice"] + 0.005)
    assert json.loads((benchmark.workdir / "recipe" / "datasets.json").read_text()) == \
        {f"{benchmark.plans(Run(runs.RECIPE, '0.2', 1))}/fold1": 901}


# ----------------------------------------------------------------------------- --dataset
def test_a_planned_dataset_trains_in_the_users_nnunet_folders(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    raw = tmp_path / "nnUNet_raw" / "Dataset027_Prostate"
    raw.mkdir(parents=True)
    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset027_Prostate"
    preprocessed.mkdir(parents=True)
    with pytest.raises(UserInputError, match="has no preprocessed 2d configuration in nnUNetPlans.json: run "
                                             "nnUNetv2_plan_and_preprocess -d 27 -c 2d first"):
        Benchmark(tmp_path / "work", None, [BASELINE], existing_dataset="27")
    resenc = Budget("benchmark_cpu", (), "3d_fullres", "nnUNetResEncUNetMPlans")
    with pytest.raises(UserInputError, match="no preprocessed 3d_fullres configuration in nnUNetResEncUNetMPlans.json: "
                                             "run nnUNetv2_plan_and_preprocess -d 27 -pl nnUNetPlannerResEncM -c "
                                             "3d_fullres first"):
        Benchmark(tmp_path / "work", None, [BASELINE], budget=resenc, existing_dataset="27")
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {"data_identifier": "d2"}}}))
    (preprocessed / "d2").mkdir()
    (preprocessed / "splits_final.json").write_text(json.dumps(NNUNET_FOLDS))
    benchmark = Benchmark(tmp_path / "work", None, [BASELINE], fractions=["2"], existing_dataset="27")
    assert (benchmark.dataset, benchmark.dataset_id) == ("Dataset027_Prostate", "27")
    commands = [s.command[0] for s in benchmark.steps() if s.command]
    assert "nnUNetv2_convert_MSD_dataset" not in commands and "nnUNetv2_plan_and_preprocess" not in commands
    assert benchmark.preprocessed == preprocessed
    assert benchmark.fold_folder(Run(BASELINE, "2", 0)).is_relative_to(tmp_path / "nnUNet_results")
    assert benchmark.environment()["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    with pytest.raises(UserInputError, match="either --msd"):
        Benchmark(tmp_path / "work", tmp_path / "Task04_Hippocampus", [BASELINE], existing_dataset="27")


def test_records_name_the_processor_kind_a_seeded_run_repeats_on():
    cpu = environment()["cpu"]
    assert cpu.endswith(f"torch kernels {torch.backends.cpu.get_cpu_capability()}") and not cpu.startswith(",")


def test_records_name_the_commit_of_the_code_that_ran():
    """A checkout's HEAD, or the commit a regular install recorded (CI installs the clone with pip)."""
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?", environment()["commit"])
