"""A real nnU-Net dataset for integration tests: the embedded Hippocampus sample converted,
planned and preprocessed (2d) by nnU-Net's own commands, once per test session."""
import json
import math
import os
import pickle
import random
import shutil
import subprocess
from pathlib import Path

import blosc2
import numpy as np
import pytest
import torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

from nnunet_contrast.commands.demo import prepare_dataset
from nnunet_contrast.commands.plans import set_options
from nnunet_contrast.nnunet_env import command_path

TEST_PLANS = "nnUNetPlans_test"
# a budget of seconds: 2 fine-tuning epochs of 2 iterations, one epoch per contrastive stage
# (PseudoLabelContrast: one warm-up and one joint epoch; CrossLevel: one contrast and one consistency epoch;
# self-training: one warm-up and one self-training epoch)
TEST_SETTINGS = [
    "batch_size=4",
    "nnunet_contrast.budget.num_epochs=2",
    "nnunet_contrast.budget.num_iterations_per_epoch=2",
    "nnunet_contrast.budget.num_val_iterations_per_epoch=1",
    "nnunet_contrast.budget.save_every=1",
    "nnunet_contrast.supconlocal.global_epochs=1",
    "nnunet_contrast.supconlocal.local_epochs=1",
    "nnunet_contrast.supconlocal.pretrain_iterations_per_epoch=3",
    "nnunet_contrast.supconlocal.local_images=2",
    "nnunet_contrast.globallocal.global_epochs=1",
    "nnunet_contrast.globallocal.local_epochs=1",
    "nnunet_contrast.globallocal.pretrain_iterations_per_epoch=3",
    "nnunet_contrast.globallocal.pretrain_batch_size=8",
    "nnunet_contrast.pseudolabel.warmup_fraction=0.5",
    "nnunet_contrast.ideal.pretrain_epochs=1",
    "nnunet_contrast.ideal.pretrain_iterations_per_epoch=3",
    "nnunet_contrast.ideal.sampled_positions=64",
    "nnunet_contrast.selftraining.warmup_fraction=0.5",
]


PLANNED = {"PlainConvUNet": "sample_nnUNetPlans.json", "ResidualEncoderUNet": "sample_nnUNetResEncUNetMPlans.json"}


def sample_plans(architecture: str = "PlainConvUNet"):
    """The sample's plans for ``architecture`` (nnU-Net's PlansManager) and its dataset.json, without preprocessing
    anything. The plans in ``tests/data`` are nnU-Net 2.8.1's own, made from the embedded sample with
    ``nnUNetv2_extract_fingerprint -d 4`` and ``nnUNetv2_plan_experiment -d 4 [-pl nnUNetPlannerResEncM]``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data = Path(__file__).parent / "data"
    return (PlansManager(json.loads((data / PLANNED[architecture]).read_text())),
            json.loads((data / "sample_dataset.json").read_text()))


def planned_network(architecture: str, configuration: str) -> torch.nn.Module:
    """The network nnU-Net's trainer builds for ``configuration`` of the sample's plans (deep supervision on)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans, dataset_json = sample_plans(architecture)
    config = plans.get_configuration(configuration)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1,
                                     plans.get_label_manager(dataset_json).num_segmentation_heads,
                                     allow_init=True, deep_supervision=True)
    assert type(network).__name__ == architecture
    return network


def run_cmd(args, env, check=True, **kwargs):
    """Run a console script of this environment; returns the CompletedProcess (text output)."""
    result = subprocess.run([command_path(args[0])] + [str(a) for a in args[1:]], env=env, text=True,
                            capture_output=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


class Hippocampus:
    """Paths and environment of the prepared sample dataset (see nnunet_contrast.commands.demo)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {}
        self.msd = root / "Task04_Hippocampus"
        self.raw = root / "nnUNet_raw" / "Dataset004_Hippocampus"
        self.preprocessed = root / "nnUNet_preprocessed" / "Dataset004_Hippocampus"
        self.results = root / "nnUNet_results" / "Dataset004_Hippocampus"
        self.unlabeled_input = root / "unlabeled"
        self.heldout = root / "heldout_two"  # two held-out scans keep prediction short
        self.heldout_labels = root / "heldout_labels"

    def run(self, *args, **kwargs):
        return run_cmd(list(args), self.env, **kwargs)

    def model_folder(self, trainer: str, plans: str = TEST_PLANS) -> Path:
        return self.results / f"{trainer}__{plans}__2d"


@pytest.fixture(scope="session")
def hippocampus(tmp_path_factory):
    data = Hippocampus(tmp_path_factory.mktemp("nnunet"))
    data.env = prepare_dataset(data.root, "0.25", TEST_SETTINGS, TEST_PLANS)
    data.env["nnUNet_n_proc_DA"] = "0"  # single-threaded, deterministic data loading
    data.env["nnUNet_def_n_proc"] = "1"
    all_heldout = data.root / "heldout"
    for folder in (data.heldout, data.heldout_labels):
        folder.mkdir()
    for case in ("hippocampus_065", "hippocampus_067"):
        shutil.copy(all_heldout / f"{case}_0000.nii.gz", data.heldout)
        shutil.copy(data.msd / "labelsTs" / f"{case}.nii.gz", data.heldout_labels)
    saved = {k: os.environ.get(k) for k in data.env}
    os.environ.update(data.env)  # for in-process trainer tests
    yield data
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


PLANS_3D = "nnUNetPlans_test3d"
ALL_PIXELS_3D = "nnUNetPlans_test3d_all"  # every pseudo-label kept
RESENC_PLANS, RESENC_PLANS_3D = "nnUNetResEncUNetMPlans_test", "nnUNetResEncUNetMPlans_test3d"  # the ResEnc M planner's
# the test budget; the sample's 3D batch (2 patches of 40 x 56 x 40) instead of the 2D one's 4
SETTINGS_3D = [s for s in TEST_SETTINGS if not s.startswith("batch_size=")] + ["batch_size=2"]


def sets(settings):
    return set_options(settings)


@pytest.fixture(scope="session")
def preprocessed_3d(hippocampus):
    """3d_fullres preprocessed by nnU-Net, the added unlabelled scan with it, and the test plans for it: nnU-Net's
    default planner's, and the ResEnc M planner's (which preprocesses as the default one)."""
    hippocampus.run("nnUNetv2_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "1")
    hippocampus.run("nnunet-contrast", "add-unlabeled", "-d", "4", "-i", hippocampus.unlabeled_input,
                    "-c", "3d_fullres")
    for name, extra in ((PLANS_3D, []), (ALL_PIXELS_3D, ["nnunet_contrast.selftraining.confidence_threshold=0"])):
        hippocampus.run("nnunet-contrast", "plans", "-d", "4", "-c", "3d_fullres", "-o", name, *sets(SETTINGS_3D + extra))
    # nnU-Net's planners call torch.set_num_threads(nnUNet_n_proc_DA), which refuses the tests' 0
    run_cmd(["nnUNetv2_plan_experiment", "-d", "4", "-pl", "nnUNetPlannerResEncM"], {**hippocampus.env,
                                                                                   "nnUNet_n_proc_DA": "1"})
    hippocampus.run("nnunet-contrast", "plans", "-d", "4", "-p", "nnUNetResEncUNetMPlans", "-o", RESENC_PLANS,
                    *sets(TEST_SETTINGS))
    hippocampus.run("nnunet-contrast", "plans", "-d", "4", "-p", "nnUNetResEncUNetMPlans", "-c", "3d_fullres",
                    "-o", RESENC_PLANS_3D, *sets(SETTINGS_3D))
    return hippocampus


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription slow-downs on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- in-process trainers
def make_plans(hippocampus, name, *settings):
    hippocampus.run("nnunet-contrast", "plans", "-d", "4", "-p", TEST_PLANS, "-o", name, *sets(settings))
    return name


def make_trainer(trainer, plans, fold=0, configuration="2d"):
    return get_trainer_from_args("4", configuration, fold, trainer, plans, False, torch.device("cpu"))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def corrupt_labels(folder: Path, cases, backup: Path):
    """Overwrite the label arrays and foreground locations of ``cases`` with random ones."""
    rng = np.random.default_rng(123)
    for case in cases:
        seg_file, pkl_file = folder / f"{case}_seg.b2nd", folder / f"{case}.pkl"
        for path in (seg_file, pkl_file):
            shutil.copy(path, backup / f"{folder.name}__{path.name}")
        seg = blosc2.open(str(seg_file), mode="r")[:]
        noise = rng.integers(0, 3, size=seg.shape).astype(seg.dtype)
        seg_file.unlink()
        blosc2.asarray(np.ascontiguousarray(noise), urlpath=str(seg_file))
        properties = pickle.loads(pkl_file.read_bytes())
        properties["class_locations"] = {c: np.argwhere(noise == c)[:50] for c in (1, 2)}
        pkl_file.write_bytes(pickle.dumps(properties))


def restore(backup: Path, folders):
    for saved in backup.iterdir():
        folder_name, file_name = saved.name.split("__", 1)
        shutil.copy(saved, folders[folder_name] / file_name)


def corrupt_images(folder: Path, cases, backup: Path):
    """Overwrite the image arrays of ``cases`` with random intensities."""
    rng = np.random.default_rng(321)
    for case in cases:
        data_file = folder / f"{case}.b2nd"
        shutil.copy(data_file, backup / f"{folder.name}__{data_file.name}")
        data = blosc2.open(str(data_file), mode="r")[:]
        noise = rng.normal(size=data.shape).astype(data.dtype)
        data_file.unlink()
        blosc2.asarray(np.ascontiguousarray(noise), urlpath=str(data_file))


def ready_trainer(trainer_name, plans, configuration="2d"):
    """A trainer with its network (seeded) and data loaders, as nnU-Net's on_train_start builds them."""
    seed_everything(0)
    trainer = make_trainer(trainer_name, plans, configuration=configuration)
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    return trainer


def stage_terms(trainer, stage_name: str, batch: dict, **given) -> dict:
    """Each loss term (unweighted) of the first stage called ``stage_name`` on ``batch``, as its
    training step computes them; ``given`` fixes parts of the step's inputs (e.g. ``unlabeled=``)."""
    from nnunet_contrast.training.step import StepInputs

    index = trainer.schedule.index_of(stage_name)
    trainer.stage_index, trainer.current_epoch = index, trainer.schedule.starts[index]
    stage = trainer.schedule.stages[index]
    inputs = StepInputs(trainer, stage, batch)
    inputs.__dict__.update(given)  # cached properties read from the instance first
    return trainer.stage_loss(stage, inputs)[1]


PLAIN = ("PlainConvUNet", "DualDecoderUNet")  # nnU-Net's default plans' U-Net, and IDEAL's with its second decoder
RESENC = ("ResidualEncoderUNet", "DualDecoderUNet")  # the ResEnc plans' U-Net, and IDEAL's


def every_stage_once(trainer_name: str, plans: str, configuration: str, networks=PLAIN) -> dict:
    """Each loss term of each stage of the trainer on a batch of the stage's own loader (stage -> term -> value),
    all seeds fixed, the teacher (if any) a copy of the network, which is one of ``networks``."""
    trainer = ready_trainer(trainer_name, plans, configuration)
    assert type(trainer.network).__name__ in networks
    if not hasattr(trainer, "schedule"):  # LabeledOnly: nnU-Net's own training
        return {}
    if hasattr(trainer, "start_teacher"):
        trainer.start_teacher()
    terms = {}
    for stage in trainer.schedule.stages:
        seed_everything(1)
        batch = next(trainer.stage_loader(stage))
        with torch.no_grad():
            terms[stage.name] = {k: v.item() for k, v in stage_terms(trainer, stage.name, batch).items()}
    trainer.on_train_end()
    return terms


def train_each_stage_once(trainer) -> None:
    """One training step of each stage (nnU-Net's one step for a trainer without a schedule): finite terms and
    weights, and the weights of what the stage trains changed."""
    from nnunet_contrast.training.schedule import ENCODER, NETWORK

    stages = trainer.schedule.stages if hasattr(trainer, "schedule") else [None]
    try:
        for index, stage in enumerate(stages):
            if stage is not None:
                trainer.current_epoch = trainer.schedule.starts[index]
                trainer.start_stage_epoch(index)
            before = [p.detach().clone() for p in trainer.network.parameters()]
            output = trainer.train_step(next(trainer.dataloader_train))
            values = {k: float(v) for k, v in output.items()}
            name = stage.name if stage else "nnU-Net"
            assert all(math.isfinite(v) for v in values.values()), (name, values)
            after = list(trainer.network.parameters())
            assert all(torch.isfinite(p).all() for p in after)
            if stage is None or {NETWORK, ENCODER} & set(stage.trains):
                assert any(not torch.equal(b, a) for b, a in zip(before, after)), name
    finally:
        trainer.on_train_end()


def self_training_losses(trainer_name, plans, stage, configuration="2d"):
    """Every term of ``stage`` on the same batches, all seeds fixed, the teacher a copy of the network."""
    trainer = ready_trainer(trainer_name, plans, configuration)
    trainer.start_teacher()
    seed_everything(1)
    batch = next(trainer.dataloader_train)
    with torch.no_grad():
        return {name: value.item() for name, value in stage_terms(trainer, stage, batch).items()}


def split_of_fold0(hippocampus):
    return json.loads((hippocampus.preprocessed / "splits_semisup.json").read_text())["folds"][0]


def preprocessed_folders(hippocampus, configuration="2d"):
    """The configuration's preprocessed training cases, then its added unlabelled ones (name -> folder)."""
    data = hippocampus.preprocessed / f"nnUNetPlans_{configuration}"
    added = data.with_name(data.name + "_unlabeled")
    return {data.name: data, added.name: added}


def losses_with_hidden_labels_corrupted(hippocampus, backup: Path, losses, hidden_cases, control, configuration="2d"):
    """``losses()`` three times: on the sample as it is; with the labels of ``hidden_cases`` (training
    cases) and of the added unlabelled scan overwritten; then after ``control(folder, backup)`` changes
    something that must matter. Everything is restored afterwards. Returns the three results. (No separate
    determinism check: losses that moved from call to call would fail ``hidden == reference``, which every
    caller asserts beside the control.)"""
    folders = preprocessed_folders(hippocampus, configuration)
    data, added = folders.values()
    reference = losses()
    try:
        corrupt_labels(data, hidden_cases, backup)
        corrupt_labels(added, ["hippocampus_118"], backup)
        hidden = losses()
        control(data, backup)
        changed = losses()
    finally:
        restore(backup, folders)
    return reference, hidden, changed


def train_then_resume(trainer_name, plans, stop_after_epochs):
    """Train for ``stop_after_epochs`` epochs of a longer plan, then load the checkpoint into a new
    trainer as ``nnUNetv2_train --c`` does. Returns (first, resumed)."""
    first = make_trainer(trainer_name, plans)
    first.num_epochs = stop_after_epochs
    first.run_training()
    resumed = make_trainer(trainer_name, plans)
    maybe_load_checkpoint(resumed, True, False)
    return first, resumed


def trained_state(trainer) -> dict:
    """What a run ends with: network, heads, the pseudo-labeller's snapshot and the EMA teacher if any
    (all on the CPU)."""
    parts = {"network": trainer.network}
    if hasattr(trainer, "heads"):
        parts["heads"] = trainer.heads
    if getattr(trainer, "pseudo_labeler", None) is not None:
        parts["labeller"] = trainer.pseudo_labeler
    if getattr(trainer, "teacher", None) is not None:
        parts["teacher"] = trainer.teacher
    return {f"{name}.{key}": value.detach().cpu().clone() for name, part in parts.items()
            for key, value in part.state_dict().items()}


class StopTraining(Exception):
    """Stands for a run killed between two epochs."""


def stop_after_epoch_end(trainer, epochs: int) -> None:
    """Make ``trainer`` stop, as if killed, right after the end of epoch ``epochs - 1`` (after nnU-Net
    has written checkpoint_latest.pth), without touching its epoch count or schedules."""
    epoch_end = trainer.on_epoch_end

    def on_epoch_end():
        epoch_end()
        if trainer.current_epoch == epochs:
            raise StopTraining
    trainer.on_epoch_end = on_epoch_end


def assert_resume_matches_uninterrupted(trainer_name, plans, stop_after_epochs):
    """A run stopped after ``stop_after_epochs`` and continued as ``nnUNetv2_train --c`` does ends in the
    state of the same run trained without a stop (in-process loading: nnUNet_n_proc_DA=0)."""
    seed_everything(0)
    uninterrupted = make_trainer(trainer_name, plans)
    uninterrupted.run_training()
    expected, log = trained_state(uninterrupted), uninterrupted.logger.local_logger.my_fantastic_logging
    Path(uninterrupted.output_folder, "checkpoint_final.pth").unlink()  # --c would take it first
    seed_everything(0)
    stopped = make_trainer(trainer_name, plans)
    stop_after_epoch_end(stopped, stop_after_epochs)
    with pytest.raises(StopTraining):
        stopped.run_training()
    resumed = make_trainer(trainer_name, plans)
    maybe_load_checkpoint(resumed, True, False)  # nnUNetv2_train --c: checkpoint_latest.pth
    assert resumed.current_epoch == stop_after_epochs
    resumed.run_training()
    assert resumed.current_epoch == uninterrupted.current_epoch
    assert resumed.logger.local_logger.my_fantastic_logging["train_losses"] == log["train_losses"]
    actual = trained_state(resumed)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def assert_same_optimizer_moments(first, resumed):
    """The Adam moments of a resumed trainer are those its checkpoint was saved with."""
    first_state, resumed_state = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert first_state.keys() == resumed_state.keys() and len(first_state) > 0
    for index in first_state:
        torch.testing.assert_close(resumed_state[index]["exp_avg"], first_state[index]["exp_avg"])


def assert_summary_is_the_dice_of_the_files(summary: dict, read) -> None:
    """nnU-Net's evaluation summary holds, for each case and foreground label, the Dice that the
    prediction and reference files give when counted here (``read(path)``: the label array); NaN where
    neither has the label, as nnU-Net writes it. Checks that predictions are written, geometry-matched
    label maps of the reference's classes, and that the summary is theirs."""
    for case in summary["metric_per_case"]:
        prediction, reference = read(case["prediction_file"]), read(case["reference_file"])
        assert prediction.shape == reference.shape
        assert set(np.unique(prediction)) <= {int(label) for label in case["metrics"]} | {0}
        for label, metrics in case["metrics"].items():
            p, r = prediction == int(label), reference == int(label)
            denominator = p.sum() + r.sum()
            expected = 2 * (p & r).sum() / denominator if denominator else float("nan")
            np.testing.assert_allclose(metrics["Dice"], expected, rtol=1e-6, err_msg=f"{case['prediction_file']} {label}")


# ----------------------------------------------------------------------------------------- tiers
def pytest_collection_modifyitems(config, items):
    """The end-to-end tier (``-m e2e``): every test on the real sample dataset (the ``hippocampus``
    fixture: nnU-Net's convert, plan and preprocess, then training) is marked ``e2e``; the fast tier is
    ``-m "not e2e"``."""
    for item in items:
        if "hippocampus" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
