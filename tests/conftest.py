"""A real nnU-Net dataset for integration tests: the embedded Hippocampus sample converted,
planned and preprocessed (2d) by nnU-Net's own commands, once per test session."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nnunet_contrast.demo import command_path, nnunet_environment
from nnunet_contrast.resources import sample_dir

TEST_PLANS = "nnUNetPlans_test"
# a budget of seconds: 2 fine-tuning epochs of 2 iterations, one epoch per contrastive stage
TEST_SETTINGS = [
    "batch_size=4",
    "nnunet_contrast.budget.num_epochs=2",
    "nnunet_contrast.budget.num_iterations_per_epoch=2",
    "nnunet_contrast.budget.num_val_iterations_per_epoch=1",
    "nnunet_contrast.budget.save_every=1",
    "nnunet_contrast.supconlocal.global_epochs=1",
    "nnunet_contrast.supconlocal.local_epochs=1",
    "nnunet_contrast.supconlocal.local_images=2",
]


def run_cmd(args, env, check=True, **kwargs):
    """Run a console script of this environment; returns the CompletedProcess (text output)."""
    result = subprocess.run([command_path(args[0])] + [str(a) for a in args[1:]], env=env, text=True,
                            capture_output=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


class Hippocampus:
    """Paths and environment of the prepared sample dataset."""

    def __init__(self, root: Path):
        self.root = root
        self.env = nnunet_environment(root)
        self.env["nnUNet_def_n_proc"] = "1"
        self.msd = root / "Task04_Hippocampus"
        self.raw = Path(self.env["nnUNet_raw"]) / "Dataset004_Hippocampus"
        self.preprocessed = Path(self.env["nnUNet_preprocessed"]) / "Dataset004_Hippocampus"
        self.results = Path(self.env["nnUNet_results"]) / "Dataset004_Hippocampus"
        self.unlabeled_input = root / "unlabeled"
        self.heldout = root / "heldout"
        self.heldout_labels = root / "heldout_labels"

    def run(self, *args, **kwargs):
        return run_cmd(list(args), self.env, **kwargs)

    def model_folder(self, trainer: str, plans: str = TEST_PLANS) -> Path:
        return self.results / f"{trainer}__{plans}__2d"


@pytest.fixture(scope="session")
def hippocampus(tmp_path_factory):
    data = Hippocampus(tmp_path_factory.mktemp("nnunet"))
    shutil.copytree(sample_dir(), data.msd)
    data.run("nnUNetv2_convert_MSD_dataset", "-i", data.msd, "-np", "2")
    data.run("nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "2d", "-np", "2")
    # from here on: single-threaded, deterministic data loading (planning needs a positive count)
    data.env["nnUNet_n_proc_DA"] = "0"
    data.run("nnunet-contrast", "split", "-d", "4", "--labeled", "0.25")
    data.unlabeled_input.mkdir()
    data.heldout.mkdir()
    data.heldout_labels.mkdir()
    for image in sorted((data.raw / "imagesTs").iterdir()):
        if image.name.startswith("hippocampus_118"):
            shutil.copy(image, data.unlabeled_input / image.name)
        elif image.name.startswith(("hippocampus_065", "hippocampus_067")):
            shutil.copy(image, data.heldout / image.name)
            label = image.name.replace("_0000.nii.gz", ".nii.gz")
            shutil.copy(data.msd / "labelsTs" / label, data.heldout_labels / label)
    data.run("nnunet-contrast", "add-unlabeled", "-d", "4", "-i", data.unlabeled_input)
    sets = [a for s in TEST_SETTINGS for a in ("--set", s)]
    data.run("nnunet-contrast", "plans", "-d", "4", "--preset", "cpu_budget", *sets, "-o", TEST_PLANS)
    saved = {k: os.environ.get(k) for k in data.env}
    os.environ.update(data.env)  # for in-process trainer tests
    yield data
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
