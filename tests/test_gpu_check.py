"""``benchmarks/gpu_check.py`` on the CPU (nnU-Net turns autocast and compile off there): the script a GPU
session runs in one command prepares the sample, trains each trainer a few iterations through nnU-Net's
run_training, times its steps and the waits for its batches, predicts with the model and writes its table."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_contrast.resources import sample_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def small_sample(folder: Path) -> Path:
    """The embedded sample with 12 training cases and one held-out scan beside the unlabelled one: nnU-Net's
    validation and prediction on the CPU take minutes for the whole sample."""
    source = sample_dir()
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.nii.gz"))
    training = sorted(path.name for path in (source / "imagesTr").iterdir())[:12]
    kept = {"imagesTr": training, "labelsTr": training,
            "imagesTs": ["hippocampus_065.nii.gz", "hippocampus_118.nii.gz"]}  # held out; unlabelled
    for subfolder, names in kept.items():
        for name in names:
            shutil.copy(source / subfolder / name, folder / subfolder / name)
    return folder


@pytest.mark.e2e
def test_gpu_check_trains_times_and_predicts_each_trainer_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    trainers = ["nnUNetTrainerLabeledOnly", "nnUNetTrainerSupConLocal"]
    # as a user's shell: without the other end-to-end tests' single-threaded loading (nnUNet_n_proc_DA=0, which
    # nnU-Net's planner passes to torch.set_num_threads) and their dataset folders
    hidden = ("nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    env = {key: value for key, value in os.environ.items() if key not in hidden}
    result = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "work"), "--device", "cpu",
                             "--msd", str(small_sample(tmp_path / "Task04_Hippocampus")), "--iterations", "2",
                             "--configurations", "2d", "--trainers", *trainers, "--out", str(out)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["machine"]["plans"] == "nnUNetPlans"
    rows = {row["trainer"]: row for row in report["results"]}
    assert list(rows) == trainers and all("error" not in row for row in rows.values()), rows
    for row in rows.values():
        assert row["seconds_per_iteration"] > 0 and row["data_wait_per_iteration"] >= 0
        assert row["predicted"] is True and row["peak_gpu_memory_gib"] is None
    # one epoch per pretraining stage, not the paper's 70 each: global, local, then nnU-Net's 4 epochs
    checkpoint = next((tmp_path / "work").rglob("nnUNetTrainerSupConLocal__*/fold_0/checkpoint_final.pth"))
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["current_epoch"] == 6
    assert "| 2d | nnUNetTrainerSupConLocal |" in result.stdout
