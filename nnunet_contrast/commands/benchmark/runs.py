"""``nnunet-contrast benchmark``: every trainer against nnU-Net at one budget, through nnU-Net's commands.

For an MSD task folder (``--msd``) it runs, in a work folder and skipping whatever is already done:
nnU-Net's convert and plan-and-preprocess of the configuration (``--configuration``, default 2d; the planner of
``--plans``, default nnU-Net's) once, ``nnunet-contrast add-unlabeled`` (the task's
``imagesTs`` scans that have no label); for a dataset already converted and planned (``--dataset ID``)
it uses the user's own nnU-Net folders and none of these. Then for each labelled fraction ``nnunet-contrast split`` (one
split file per fraction, one seed) and ``nnunet-contrast plans`` (the budget plus that split file),
then ``nnUNetv2_train`` for every trainer and fold. A run is scored by nnU-Net's own final validation
of its fold (``fold_F/validation/summary.json``): the fold's validation cases, which are never
training cases and which nnU-Net predicts with the final weights (no model selection on them).

Work folder::

    nnUNet_raw/ nnUNet_preprocessed/ nnUNet_results/   nnU-Net's folders (--msd only)
    logs/PLANS/TRAINER_foldF.log                        each training's output
    results/PLANS/TRAINER_foldF.json                    one record per finished run
    results.csv                                         every record, one line each
    pretrained/SOURCE/                                  nnU-Net's results of the rows TARGET@SOURCE (``pretrained_steps``)

``PLANS`` is ``nnUNetPlans_bench-BUDGET-DIGEST_sSEED_tTRAINSEED_lFRACTION``: the digest covers the
budget preset's content and the ``--set`` arguments, so runs of two budgets, two split seeds or two
training seeds never share a results folder or a table. The training seed (``--train-seed``, the
plans' ``nnunet_contrast.run.seed``) is left out of the name when it is -1 (unseeded, as nnU-Net and
as the benchmarks before it existed). A run stopped part-way (a checkpoint but no validation summary: training or
nnU-Net's final validation was interrupted) is continued with ``--c``. A run whose record is in ``results/`` does
not train again, even without its nnU-Net folder (records of the same processor kind copied into a new work
folder, as ``benchmarks/queue.sh`` does on a new machine), except a baseline whose model the recipe predicts with.
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from nnunet_contrast.commands.benchmark.recipe import MaintainersRecipe
from nnunet_contrast.commands.benchmark.steps import ALL_LABELS, BASELINE, FROM, RECIPE, Run, Step
from nnunet_contrast.commands.plans import set_options
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.settings import SETTINGS_KEY

try:
    import fcntl
except ImportError:  # Windows: no work-folder lock
    fcntl = None

DEFAULT_FRACTIONS = ("0.01", "0.05", "0.1", "0.2")
SOURCE_LOG = "source.log"  # a row TARGET@SOURCE's log of its SOURCE run: logs/PLANS/TARGET@SOURCE_foldF.source.log
DEFAULT_BUDGET = "benchmark_cpu"


def normalised_fraction(text: str) -> str:
    """``"0.050"`` -> ``"0.05"`` (one plans folder per fraction); counts stay counts (``"10"``)."""
    from nnunet_contrast.data.split import parse_labeled

    value = parse_labeled(text)
    if isinstance(value, int):
        return str(value)
    if value == 1.0:
        raise UserInputError("--fractions 1.0 is the upper bound, which runs by itself (LabeledOnly on all labels): "
                             "leave it out, or pass --no-upper-bound to skip it")
    return f"{value:g}"


BASELINE_SECTIONS = ("budget", "semisup", "run")  # the sections of our settings that LabeledOnly reads
BASELINE_TRAINERS = (BASELINE, RECIPE)  # the rows that train in ``Budget.for_baseline()``


def baseline_reads(assignment: str) -> bool:
    """Whether LabeledOnly reads a ``--set`` assignment: nnU-Net's own keys and our budget, split and run
    sections; not the self-training or method sections."""
    key = assignment.split("=", 1)[0].split(".")
    return key[0] != SETTINGS_KEY or len(key) < 3 or key[1] in BASELINE_SECTIONS


DEFAULT_CONFIGURATION, DEFAULT_PLANS = "2d", "nnUNetPlans"
# the planner (nnUNetv2_plan_and_preprocess -pl) that writes each plans identifier, for --msd
PLANNERS = {DEFAULT_PLANS: "ExperimentPlanner", "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
            "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL", "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL"}


def planner_option(source_plans: str) -> List[str]:
    """``nnUNetv2_plan_and_preprocess``'s ``-pl`` for the planner that writes ``source_plans`` (none for
    nnU-Net's default planner, or for plans of a planner not in ``PLANNERS``)."""
    if source_plans == DEFAULT_PLANS or source_plans not in PLANNERS:
        return []
    return ["-pl", PLANNERS[source_plans]]


@dataclass(frozen=True)
class Budget:
    """A preset of ``plans/`` plus ``--set`` assignments, in a configuration of nnU-Net's plans of a planner: the
    same for every run of a benchmark, except that the baseline (and the recipe built on it) trains in
    ``for_baseline()``."""
    preset: str
    assignments: tuple = ()
    configuration: str = DEFAULT_CONFIGURATION
    source_plans: str = DEFAULT_PLANS

    def for_baseline(self) -> "Budget":
        """Without the assignments LabeledOnly never reads: one LabeledOnly run pairs with every self-training
        and method setting of the same budget, and is not trained again for each."""
        return dataclasses.replace(self, assignments=tuple(a for a in self.assignments if baseline_reads(a)))

    @functools.cached_property
    def digest(self) -> str:
        """Of the preset's blocks that the configuration reads, the assignments and (where not nnU-Net's defaults)
        the configuration and the plans: every budget trains in plans files and result folders of its own, and a
        preset's block of another configuration leaves the digests of the records trained before it."""
        from nnunet_contrast.settings import BASE_CONFIGURATION, load_preset

        preset = load_preset(self.preset)
        read = (BASE_CONFIGURATION, self.configuration)
        preset["configurations"] = {c: b for c, b in preset.get("configurations", {}).items() if c in read}
        content = {"preset": preset, "set": list(self.assignments)}
        if self.configuration != DEFAULT_CONFIGURATION:
            content["configuration"] = self.configuration
        if self.source_plans != DEFAULT_PLANS:
            content["plans"] = self.source_plans
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]

    def plans_identifier(self, fraction: str, seed: int, train_seed: int = -1) -> str:
        trained = f"_t{train_seed}" if train_seed >= 0 else ""
        return f"nnUNetPlans_bench-{self.preset}-{self.digest}_s{seed}{trained}_l{fraction}"


@dataclass
class Benchmark:
    workdir: Path
    msd: Optional[Path]             # an MSD task folder, or None with ``dataset``
    trainers: Sequence[str]
    fractions: Sequence[str] = DEFAULT_FRACTIONS
    folds: Sequence[int] = (0,)
    budget: Budget = field(default_factory=lambda: Budget(DEFAULT_BUDGET))
    seed: int = 0
    device: str = "cpu"
    upper_bound: bool = True
    train_seed: int = 0
    existing_dataset: Optional[str] = None  # ``--dataset``: converted and planned, in the user's nnU-Net folders
    with_recipe: bool = False               # the maintainers' recipe as a row (``recipe.py``)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        if (self.msd is None) == (self.existing_dataset is None):
            raise UserInputError("pass either --msd TASK_FOLDER or --dataset ID (a dataset nnU-Net has converted "
                                 "and planned), not both")
        if self.msd is not None:
            self.msd = Path(self.msd).resolve()
            match = re.fullmatch(r"Task(\d+)_(\w+)", self.msd.name)
            if not match:
                raise UserInputError(f"--msd {self.msd} is not an MSD task folder (TaskXX_Name): pass e.g. "
                                     f"--msd Task04_Hippocampus")
            self.dataset_id = str(int(match.group(1)))
            self.dataset = f"Dataset{int(match.group(1)):03d}_{match.group(2)}"
            if self.budget.source_plans not in PLANNERS:
                raise UserInputError(f"--plans {self.budget.source_plans}: with --msd the plans are one of "
                                     f"{', '.join(PLANNERS)}; plan other plans yourself and pass --dataset ID")
        else:
            self.dataset = self.planned_dataset(self.existing_dataset, self.budget)
            self.dataset_id = str(int(self.dataset[len("Dataset"):].split("_")[0]))
        self.fractions = list(dict.fromkeys(normalised_fraction(f) for f in self.fractions))
        self.trainers = list(dict.fromkeys([BASELINE, *self.trainers, *[RECIPE] * self.with_recipe]))  # baseline first
        self.check_folds_and_counts()

    def check_folds_and_counts(self) -> None:
        """Every fold exists in nnU-Net's split, and every count of labelled volumes leaves unlabelled
        training cases in every fold: checked before anything is written."""
        from nnunet_contrast.data.split import parse_labeled

        folds = self.nnunet_folds()
        missing = [fold for fold in self.folds if not 0 <= fold < len(folds)]
        if missing:
            raise UserInputError(f"--folds {' '.join(map(str, missing))}: {self.dataset} has folds 0 to {len(folds) - 1} "
                                 f"in nnU-Net's splits_final.json: pass folds among them")
        fold = min(self.folds, key=lambda f: len(folds[f]["train"]))
        cases = len(folds[fold]["train"])
        too_many = [f for f in self.fractions if isinstance(parse_labeled(f), int) and int(f) >= cases]
        if too_many:
            raise UserInputError(f"--fractions {too_many[0]}: fold {fold} of {self.dataset} has {cases} training cases; "
                                 f"a count of labelled volumes must be below that (all labels is the upper bound, "
                                 f"which runs by itself)")

    def nnunet_folds(self) -> list:
        """nnU-Net's folds of the dataset, as its trainer will use them, read or computed without writing."""
        from nnunet_contrast.nnunet_env import case_identifiers, configuration_data_folder, default_folds, load_plans

        existing = self.preprocessed / "splits_final.json"
        if existing.is_file():
            return json.loads(existing.read_text())
        if self.msd is None:
            plans = load_plans(self.dataset, self.budget.source_plans, self.configuration)
            return default_folds(case_identifiers(configuration_data_folder(self.dataset, plans, self.configuration)))
        cases = [p.name[:-len(".nii.gz")] for p in (self.msd / "imagesTr").glob("*.nii.gz") if not p.name.startswith(".")]
        if not cases:
            raise UserInputError(f"--msd {self.msd} has no training images (imagesTr/*.nii.gz): pass an MSD task folder")
        return default_folds(cases)

    @staticmethod
    def planned_dataset(dataset: str, budget: Budget) -> str:
        """The name of a dataset of the user's nnU-Net folders whose plans have the budget's configuration,
        preprocessed."""
        from nnunet_contrast.nnunet_env import dataset_name, require_path_variables

        require_path_variables()
        name, configuration = dataset_name(dataset), budget.configuration
        plans = Path(os.environ["nnUNet_preprocessed"]) / name / f"{budget.source_plans}.json"
        configurations = json.loads(plans.read_text()).get("configurations", {}) if plans.is_file() else {}
        data = configuration in configurations and \
            (plans.parent / configurations[configuration].get("data_identifier", "")).is_dir()
        if not data:
            planner = " ".join(["", *planner_option(budget.source_plans)])
            raise UserInputError(f"--dataset {dataset}: {name} has no preprocessed {configuration} configuration in "
                                 f"{plans.name}: run nnUNetv2_plan_and_preprocess -d {dataset}{planner} "
                                 f"-c {configuration} first")
        return name

    # -- where things are -------------------------------------------------------------------------
    def nnunet_folder(self, variable: str) -> Path:
        """One of nnU-Net's folders: the work folder's for an MSD task, the user's own for ``--dataset``."""
        return self.workdir / variable if self.msd is not None else Path(os.environ[variable])

    def environment(self, create: bool = True) -> dict:
        """What the commands run with: nnU-Net's folders (see ``nnunet_folder``; created unless ``create`` is
        False) and small-machine pools."""
        from nnunet_contrast.nnunet_env import nnunet_environment

        return nnunet_environment(self.workdir if self.msd is not None else None, create)

    @property
    def preprocessed(self) -> Path:
        return self.nnunet_folder("nnUNet_preprocessed") / self.dataset

    def split_name(self, fraction: str) -> str:
        return f"splits_semisup_seed{self.seed}_l{fraction}.json"

    @property
    def configuration(self) -> str:
        return self.budget.configuration

    def budget_of(self, run: Run) -> Budget:
        """The baseline's and the recipe's runs train in the budget without the settings they ignore."""
        return self.budget.for_baseline() if run.trainer in BASELINE_TRAINERS else self.budget

    def plans(self, run: Run) -> str:
        return self.budget_of(run).plans_identifier(run.fraction, self.seed, self.train_seed)

    @functools.cached_property
    def recipe(self):
        return MaintainersRecipe(self)

    def results_root(self, run: Run) -> Path:
        """nnU-Net's results folder of a run. A row TARGET@SOURCE trains SOURCE, then TARGET, in one of its own
        (``WORKDIR/pretrained/SOURCE``): TARGET's fold folder is not that of TARGET's own row."""
        if run.pretrained_by:
            return self.workdir / "pretrained" / run.pretrained_by
        return self.nnunet_folder("nnUNet_results")

    def fold_folder(self, run: Run, trainer: Optional[str] = None) -> Path:
        """nnU-Net's fold folder of the run's trainer (or of ``trainer`` in the run's results folder)."""
        if run.trainer == RECIPE:
            return self.recipe.fold_folder(run)
        name = f"{trainer or run.nnunet_trainer}__{self.plans(run)}__{self.configuration}"
        return self.results_root(run) / self.dataset / name / f"fold_{run.fold}"

    def run_file(self, folder: str, run: Run, suffix: str) -> Path:
        """``WORKDIR/folder/PLANS/TRAINER_foldF.suffix``: records, logs and wall times of a run."""
        return self.workdir / folder / self.plans(run) / f"{run.trainer}_fold{run.fold}.{suffix}"

    def record_path(self, run: Run) -> Path:
        return self.run_file("results", run, "json")

    # -- what to do -------------------------------------------------------------------------------
    def runs(self) -> List[Run]:
        """The upper bound first, then fraction by fraction and fold by fold with the baseline first: a
        stopped benchmark leaves whole cells, each with its reference points."""
        trainers = sorted(self.trainers, key=lambda t: (t != BASELINE, t != RECIPE))  # the recipe needs the baseline
        runs = [Run(BASELINE, ALL_LABELS, fold) for fold in self.folds] if self.upper_bound else []
        runs += [Run(t, f, fold) for f in self.fractions for fold in self.folds for t in trainers]
        return list(dict.fromkeys(runs))

    def steps(self) -> List[Step]:
        steps = self.preparation_steps()
        fractions = list(dict.fromkeys(r.fraction for r in self.runs()))
        for fraction in fractions:
            steps += self.fraction_steps(fraction)
        for run in self.runs():
            steps += self.run_steps(run)
        return steps

    def preparation_steps(self) -> List[Step]:
        if self.msd is None:  # --dataset: converted and planned already
            return []
        unlabeled = self.workdir / "unlabeled"
        stamps = self.workdir / "stamps" / self.dataset  # these commands' outputs exist before they finish
        source, configuration = self.budget.source_plans, self.configuration
        steps = [
            Step("convert the MSD task", stamps / "converted",
                 ["nnUNetv2_convert_MSD_dataset", "-i", str(self.msd), "-np", "2"], stamp=True),
            Step(f"plan and preprocess {configuration}", stamps / self.stamp_name("preprocessed"),
                 ["nnUNetv2_plan_and_preprocess", "-d", self.dataset_id, *planner_option(source), "-c", configuration,
                  "-np", "2"],
                 stamp=True)]
        if self.unlabeled_scans():
            steps.append(Step("add the unlabelled scans", stamps / self.stamp_name("unlabeled_added"),
                              ["nnunet-contrast", "add-unlabeled", "-d", self.dataset_id, "-i", str(unlabeled),
                               "-p", source, "-c", configuration],
                              before=lambda: self.collect_unlabeled(unlabeled), stamp=True))
        return steps

    def stamp_name(self, done: str) -> str:
        """A preparation step's stamp, one per plans and configuration (nnU-Net's defaults: as before both existed)."""
        if (self.budget.source_plans, self.configuration) == (DEFAULT_PLANS, DEFAULT_CONFIGURATION):
            return done
        return f"{done}_{self.budget.source_plans}_{self.configuration}"

    def fraction_steps(self, fraction: str) -> List[Step]:
        """The split file, then a plans file per budget its runs train in."""
        split = self.split_name(fraction)
        budgets = dict.fromkeys(self.budget_of(run) for run in self.runs() if run.fraction == fraction)
        return [Step(f"split {fraction}", self.preprocessed / split,
                     ["nnunet-contrast", "split", "-d", self.dataset_id, "--labeled", fraction, "--seed",
                      str(self.seed), "--name", split])] + \
            [self.plans_step(budget, fraction, split) for budget in budgets]

    def plans_step(self, budget: Budget, fraction: str, split: str) -> Step:
        plans = budget.plans_identifier(fraction, self.seed, self.train_seed)
        return Step(f"plans {plans}", self.preprocessed / f"{plans}.json",
                    ["nnunet-contrast", "plans", "-d", self.dataset_id, "-p", budget.source_plans, "-c",
                     budget.configuration, "--preset", budget.preset,
                     *set_options([*budget.assignments, f"nnunet_contrast.semisup.split_file={split}",
                                   f"nnunet_contrast.run.seed={self.train_seed}"]), "-o", plans])

    @functools.cached_property
    def processor_kind(self) -> str:
        import torch

        from nnunet_contrast.commands.benchmark.records import cpu_description

        return cpu_description(torch)

    def recorded(self, run: Run) -> bool:
        """Whether ``run`` has its record here; one of another processor kind is refused (a seeded run repeats on
        its own kind only, and training it here would overwrite that record)."""
        path = self.record_path(run)
        if not path.exists():
            return False
        from nnunet_contrast.commands.benchmark.records import kind

        theirs = kind(json.loads(path.read_text()))
        if theirs != self.processor_kind:
            raise UserInputError(f"{path} was recorded on another processor kind ({theirs}; this machine: "
                                 f"{self.processor_kind}): benchmark this kind in a work folder of its own")
        return True

    def run_steps(self, run: Run) -> List[Step]:
        record = Step(f"record {run.trainer} {run.fraction} fold {run.fold}", self.record_path(run),
                      action=lambda: self.write_record(run))
        if run.trainer == RECIPE:
            return self.recipe.steps(run) + [record]
        if self.recorded(run) and not (self.with_recipe and run.trainer == BASELINE):
            return [record]  # recorded (here, or a record of this kind copied in): the recipe needs the model
        if run.pretrained_by:
            return self.pretrained_steps(run) + [record]
        return [self.train_step(run), record]

    def train_step(self, run: Run, trainer: Optional[str] = None, done: Optional[Path] = None,
                   log_suffix: str = "log", **fields) -> Step:
        """``nnUNetv2_train`` of the run's trainer (or of ``trainer`` in the run's results folder), done when nnU-Net's
        validation summary (or ``done``) exists, continued with ``--c`` where stopped; ``fields``: the Step's others."""
        trainer = trainer or run.nnunet_trainer
        fold = self.fold_folder(run, trainer)
        return Step(f"train {trainer} {run.fraction} fold {run.fold}", done or fold / "validation" / "summary.json",
                    ["nnUNetv2_train", self.dataset_id, self.configuration, str(run.fold), "-tr", trainer,
                     "-p", self.plans(run), "-device", self.device],
                    resume_if=(fold / "checkpoint_latest.pth", fold / "checkpoint_final.pth"),
                    log=self.run_file("logs", run, log_suffix), **fields)

    def pretrained_steps(self, run: Run) -> List[Step]:
        """A row TARGET@SOURCE, as a user runs it (README, "The nnU-Net workflow"): SOURCE's whole run, then TARGET's
        from the ``checkpoint_pretrained.pth`` SOURCE saved as its fine-tuning began (``-pretrained_weights``); both
        in the row's results folder, on the same plans and fold. Several rows of one SOURCE share its run."""
        from nnunet_contrast.training.method import PRETRAINED_CHECKPOINT

        source = run.pretrained_by  # nnU-Net makes the results folder it writes to
        env = {**self.environment(create=False), "nnUNet_results": str(self.results_root(run))}
        pretrained = self.fold_folder(run, source) / PRETRAINED_CHECKPOINT
        missing = (f"{source} saved no {PRETRAINED_CHECKPOINT}: its schedule has no pretraining stage (the 'Stages' line "
                   f"of its log); after '{FROM}' name a trainer that pretrains, e.g. nnUNetTrainerGlobalLocalContrast")
        return [self.train_step(run, source, pretrained, SOURCE_LOG, env=env, missing=missing),
                self.train_step(run, env=env, start_only=("-pretrained_weights", str(pretrained)))]

    # -- the unlabelled scans of the MSD task -------------------------------------------------------
    def unlabeled_scans(self) -> List[Path]:
        """``imagesTs`` scans of the MSD task with no label in ``labelsTs`` (MSD's test images)."""
        images = self.msd / "imagesTs" if self.msd is not None else None
        if images is None or not images.is_dir():
            return []
        labels = self.msd / "labelsTs"
        return sorted(p for p in images.iterdir() if p.name.endswith(".nii.gz") and not p.name.startswith(".")
                      and not (labels / p.name).exists())

    def collect_unlabeled(self, folder: Path) -> None:
        """nnU-Net's converted copies (``CASE_0000.nii.gz``) of the unlabelled scans, into ``folder``."""
        raw_images = self.workdir / "nnUNet_raw" / self.dataset / "imagesTs"
        if not raw_images.is_dir():
            raise UserInputError(f"{raw_images} is missing: the conversion of {self.msd} did not finish; delete "
                                 f"{self.workdir / 'stamps'} and run the benchmark again")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for scan in self.unlabeled_scans():
            case = scan.name[:-len(".nii.gz")]
            for converted in raw_images.glob(f"{case}_*.nii.gz"):
                shutil.copy(converted, folder / converted.name)

    # -- records ----------------------------------------------------------------------------------
    def write_record(self, run: Run) -> None:
        from nnunet_contrast.commands.benchmark.records import run_record, write_csv
        from nnunet_contrast.nnunet_env import write_json_atomic

        record = run_record(run, self.fold_folder(run), self.preprocessed, self.budget_of(run), self.seed, self.device,
                            *wall_time(self.run_file("logs", run, "log")))
        if run.pretrained_by:  # the run of SOURCE it started from, timed apart (the wall time is TARGET's)
            record["source_wall_seconds"] = wall_time(self.run_file("logs", run, SOURCE_LOG))[0]
        self.record_path(run).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.record_path(run), record)
        write_csv(self.workdir)

    @contextlib.contextmanager
    def lock(self):
        """One benchmark at a time per work folder: two would train the same run into one folder. Yields
        the lock's file descriptor, for the training commands to inherit: a training left running by a
        killed benchmark still holds the lock. No lock on Windows (no ``fcntl``)."""
        path = self.workdir / ".benchmark.lock"
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserInputError(f"cannot create {path} ({err.strerror}): pass a writable --workdir") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserInputError(f"another 'nnunet-contrast benchmark' (or a training it started) is running in "
                                 f"{self.workdir}: wait for it to finish, or pass another --workdir") from None
        except OSError as err:
            os.close(fd)
            raise UserInputError(f"cannot lock {path} ({err.strerror}): pass a --workdir on a local disk") from None
        try:
            yield fd
        finally:
            os.close(fd)


def wall_time(log: Path) -> Tuple[Optional[float], int]:
    """Seconds the training commands of a run took over the calls that ended, and how many calls were
    killed before they could write their time (``LOG.wall``: ``start`` when a call starts, its seconds
    when it ends)."""
    wall = log.with_suffix(".wall")
    if not wall.is_file():
        return None, 0
    lines = wall.read_text().split()
    stopped = sum(1 for line, after in zip(lines, lines[1:] + ["start"]) if line == after == "start")
    return round(sum(float(line) for line in lines if line != "start"), 1), stopped


def subprocess_runner(command: List[str], env: dict, log: Optional[Path], keep_fds: Sequence[int] = ()) -> None:
    """Runs a command of this environment; its output goes to ``log`` (appended) or to the console.
    With a log, the command's start and then its wall time are appended to ``LOG.wall``. The command
    inherits ``keep_fds`` (the work folder's lock)."""
    from nnunet_contrast.nnunet_env import command_path

    argv, keep_fds = [command_path(command[0])] + command[1:], tuple(keep_fds)
    started = time.time()
    if log is None:
        result = subprocess.run(argv, env=env, pass_fds=keep_fds)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log.with_suffix(".wall"), "a") as wall:
            wall.write("start\n")
        with open(log, "a") as out:
            result = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=keep_fds)
        with open(log.with_suffix(".wall"), "a") as wall:
            wall.write(f"{time.time() - started:.1f}\n")
    if result.returncode != 0:
        where = f"; its output is in {log}" if log else ""
        raise UserInputError(f"'{shlex.join(command)}' failed with exit code {result.returncode}{where}. Fix the "
                             f"cause and run the benchmark again: finished runs are skipped, stopped ones continue")


def execute(steps: Sequence[Step], env: dict, runner=subprocess_runner, dry_run: bool = False,
            out: Callable[[str], None] = print) -> int:
    """Does every step not done yet, in order; returns how many were (or, dry, would be) done."""
    count = 0
    for step in steps:
        if step.done.exists():
            continue
        count += 1
        if step.action is not None:
            out(f"# {step.describe}")
            if not dry_run:
                step.action()
            continue
        command = step.command_now()
        results = (step.env or {}).get("nnUNet_results")  # shown where the step trains in a folder of its own
        shown = [f"nnUNet_results={results}"] if results and results != env.get("nnUNet_results") else []
        out("$ " + shlex.join(shown + command) + (f"   > {step.log}" if step.log else ""))
        if dry_run:
            continue
        if step.before is not None:
            step.before()
        runner(command, step.env or env, step.log)
        if step.stamp:
            step.done.parent.mkdir(parents=True, exist_ok=True)
            step.done.touch()
        if not step.done.exists():
            raise UserInputError(step.missing or f"'{shlex.join(command)}' finished without writing {step.done}: "
                                                 f"see its output")
    return count
