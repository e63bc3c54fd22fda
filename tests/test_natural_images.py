"""RGB natural images (the data of Zhao et al.: polyps, skin lesions) in nnU-Net's PNG format
(NaturalImage2DIO): a small synthetic dataset is planned, split, trained on with the cross-level
trainer (its contrast phase, then its consistency phase), predicted and evaluated through the real commands (the e2e tier)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_summary_is_the_dice_of_the_files, run_cmd
from nnunet_contrast.nnunet_env import nnunet_environment

pytestmark = pytest.mark.e2e

DATASET = "Dataset005_Blobs"
CASES, TEST_CASES, SIZE = 16, 2, 64


def blob_case(rng):
    """A textured RGB background with one coloured ellipse, and its mask (1 inside)."""
    y, x = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.uniform(18, SIZE - 18, 2)
    ry, rx = rng.uniform(7, 14, 2)
    mask = (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)
    image = rng.normal(90, 20, (SIZE, SIZE, 3))
    image[mask == 1] = rng.normal([200, 80, 60], 20, (int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    env = nnunet_environment(root)
    # planning needs a positive count of processes (the hippocampus fixture may have set 0 in os.environ)
    env.update({"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "2"})
    raw = root / "nnUNet_raw" / DATASET
    folders = {name: raw / name for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(CASES + TEST_CASES):
        image, mask = blob_case(rng)
        split = "Tr" if i < CASES else "Ts"
        Image.fromarray(image).save(folders[f"images{split}"] / f"blob_{i:03d}_0000.png")
        Image.fromarray(mask).save(folders[f"labels{split}"] / f"blob_{i:03d}.png")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "blob": 1},
        "numTraining": CASES, "file_ending": ".png", "overwrite_image_reader_writer": "NaturalImage2DIO"}))
    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", "5", "-c", "2d", "-np", "1"], env)
    env["nnUNet_n_proc_DA"] = "0"  # single-threaded data loading for training
    run_cmd(["nnunet-contrast", "split", "-d", "5", "--labeled", "0.5"], env)
    run_cmd(["nnunet-contrast", "plans", "-d", "5", "-o", "RGBPlans", "--preset", "cpu_budget",
             "--set", "batch_size=4", "--set", "nnunet_contrast.budget.num_epochs=2",
             "--set", "nnunet_contrast.budget.num_iterations_per_epoch=2",
             "--set", "nnunet_contrast.budget.num_val_iterations_per_epoch=1",
             "--set", "nnunet_contrast.ideal.pretrain_iterations_per_epoch=2",
             "--set", "nnunet_contrast.ideal.sampled_positions=64"], env)
    return root, env, folders


# CrossLevel: the method of the papers with RGB data (Zhao et al.); its sub-patch grid on a 64 x 64 plan
@pytest.mark.parametrize("trainer", ["nnUNetTrainerCrossLevel"])
def test_rgb_png_dataset_trains_predicts_evaluates(blobs, trainer):
    root, env, folders = blobs
    plans = json.loads((root / "nnUNet_preprocessed" / DATASET / "RGBPlans.json").read_text())
    assert plans["configurations"]["2d"]["patch_size"] == [SIZE, SIZE]
    result = run_cmd(["nnUNetv2_train", "5", "2d", "0", "-tr", trainer, "-p", "RGBPlans", "-device", "cpu"], env)
    assert "Training done" in result.stdout
    model = root / "nnUNet_results" / DATASET / f"{trainer}__RGBPlans__2d"
    if trainer == "nnUNetTrainerCrossLevel":
        assert_crosslevel_ran_contrast_then_consistency(result.stdout, model)
    predictions = root / f"pred_{trainer}"
    run_cmd(["nnUNetv2_predict", "-i", folders["imagesTs"], "-o", predictions, "-d", "5", "-c", "2d", "-tr", trainer,
             "-p", "RGBPlans", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in predictions.glob("*.png")) == ["blob_016.png", "blob_017.png"]
    run_cmd(["nnUNetv2_evaluate_folder", folders["labelsTs"], predictions, "-djfile", model / "dataset.json",
             "-pfile", model / "plans.json"], env)
    summary = json.loads((predictions / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == TEST_CASES
    assert_summary_is_the_dice_of_the_files(summary, lambda path: np.asarray(Image.open(path)))


def assert_crosslevel_ran_contrast_then_consistency(log: str, model) -> None:
    # the 64 x 64 plan pools by 16: a 16 x 16 cell alone would leave a 1 x 1 bottleneck
    assert "Cross-level grid: 4 x 4 sub-patches of 16 x 16 pixels (padded to 32 x 16)" in log
    assert "cross_level_contrast_loss (contrast)" in log and "patch_consistency_loss (consistency)" in log
    assert "Semi-supervised split splits_semisup.json:" in log
    for name in ["progress.png", "nnunet_contrast_settings.json", "validation/summary.json"]:
        assert (model / "fold_0" / name).exists(), name
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # each term logged under its own name, NaN in the epochs of the other
    contrast, consistency = (checkpoint["logging"][key]
                             for key in ("cross_level_contrast_loss", "patch_consistency_loss"))
    assert contrast[0] == contrast[0] and contrast[1] != contrast[1]
    assert consistency[0] != consistency[0] and consistency[1] == consistency[1]
    assert checkpoint["logging"]["stage"] == [0, 1]
    assert any(k.startswith("cell.") for k in checkpoint["nnunet_contrast"]["heads"])  # a flat state dict
    assert not any(k.startswith("cell") for k in checkpoint["network_weights"])
