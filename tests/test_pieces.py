"""Unit tests of the pure pieces: heads, feature taps, two-view augmentation, settings, split,
plans presets, start-up hook, unlabelled file naming."""
import json
import math
import os

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from conftest import sample_plans
from nnunet_contrast import _autoload
from nnunet_contrast.data.views import ViewAugmentation, intensity_view, spatial_view, two_views
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.network.heads import DenseProjectionHead, GlobalProjectionHead
from nnunet_contrast.commands.plans import build_plans, parse_assignment
from nnunet_contrast.resources import bundled_dir
from nnunet_contrast.data.split import SPLIT_FORMAT, fold_split, make_split, parse_labeled
from nnunet_contrast.data.unlabeled import group_channel_files
from nnunet_contrast.settings import preset_configuration, resolve_settings
from nnunet_contrast.network.taps import (bottleneck_features, decoder_channels, encoder_channels,
                                  forward_with_decoder_features, tap_decoder_stage)


def small_unet(deep_supervision=True):
    return PlainConvUNet(1, 3, [8, 16, 32], torch.nn.Conv2d, 3, [1, 2, 2], 2, 3, [2, 2],
                         norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=deep_supervision)


# ----------------------------------------------------------------------------- heads and taps
def test_global_head_gives_unit_vectors():
    z = GlobalProjectionHead(32, 16, 8)(torch.randn(5, 32, 4, 3))
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


def test_dense_head_gives_unit_vectors_per_pixel():
    z = DenseProjectionHead(8, 16, 4)(torch.randn(2, 8, 6, 5))
    assert z.shape == (2, 4, 6, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 6, 5))


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_taps_on_nnunet_unet(deep_supervision):
    net = small_unet(deep_supervision)
    x = torch.randn(2, 1, 24, 16)
    assert encoder_channels(net) == 32 and decoder_channels(net) == 8
    assert bottleneck_features(net, x).shape == (2, 32, 6, 4)
    output, features = forward_with_decoder_features(net, x)
    assert features.shape == (2, 8, 24, 16)
    seg = output[0] if deep_supervision else output
    assert seg.shape == (2, 3, 24, 16)
    # the hook is gone afterwards, and the taps do not change the network's output
    with tap_decoder_stage(net) as tap:
        pass
    assert tap == {}
    assert not net.decoder.stages[-1]._forward_hooks
    net.eval()
    plain = net(x)
    torch.testing.assert_close(forward_with_decoder_features(net, x)[0], plain)


def test_decoder_features_of_a_compiled_network():
    """nnU-Net compiles its network on CUDA; hooks added after compilation do not run in the graph."""
    net = small_unet().eval()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(2, 1, 24, 16)
    compiled(x)  # compiled before the tap exists, as nnU-Net's validation steps do
    output, features = forward_with_decoder_features(compiled, x)
    assert features.shape == (2, 8, 24, 16)
    torch.testing.assert_close(output[0], net(x)[0])


def test_decoder_features_carry_gradient_to_encoder():
    net = small_unet()
    _, features = forward_with_decoder_features(net, torch.randn(1, 1, 16, 16))
    features.sum().backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- augmentation
def test_intensity_view_keeps_geometry_and_changes_values():
    torch.manual_seed(0)
    x = torch.zeros(3, 1, 20, 16)
    x[:, :, 5:10, 4:8] = 5.0
    view = intensity_view(x, ViewAugmentation(noise_std=0.0))
    assert view.shape == x.shape
    # the bright square stays where it is: intensity changes only
    assert (view[:, :, 5:10, 4:8].mean() > view[:, :, 12:, 10:].mean() + 1)
    a, b = two_views(x, spatial=False)
    assert not torch.allclose(a, b)


def test_spatial_view_moves_content():
    torch.manual_seed(0)
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 4:12, 4:12] = 1.0
    aug = ViewAugmentation(brightness=0, contrast=0, gamma=0, noise_std=0, rotation_degrees=30,
                           scale=0.2, translate=0.2, flip_p=0.5)
    moved = spatial_view(x, aug)
    assert moved.shape == x.shape and torch.isfinite(moved).all()
    assert (moved - x).abs().mean() > 0.01


def test_view_augmentation_validates():
    with pytest.raises(ValueError):
        ViewAugmentation(brightness=1.5)
    with pytest.raises(ValueError):
        ViewAugmentation(flip_p=2)


# ----------------------------------------------------------------------------- settings
def test_settings_defaults_come_from_presets():
    settings = resolve_settings({}, ["base", "supconlocal_hu2021"], method_key="supconlocal")
    preset = json.loads((bundled_dir("plans") / "supconlocal_hu2021.json").read_text())
    assert settings.as_dict()["supconlocal"] == preset["configurations"]["2d"]["nnunet_contrast"]["supconlocal"]
    assert settings.budget.num_epochs == 1000  # nnU-Net's own default
    assert settings.method.local_mode == "block" and settings.run.seed == -1


def test_settings_override_and_errors():
    settings = resolve_settings({"nnunet_contrast": {"supconlocal": {"stride": 2, "pretrain_lr": 1}}},
                                ["base", "supconlocal_hu2021"], method_key="supconlocal")
    assert settings.method.stride == 2 and settings.method.pretrain_lr == 1
    assert isinstance(settings.method.pretrain_lr, float)  # an int may set a float setting; it reads as a float
    with pytest.raises(ValueError, match="unknown setting nnunet_contrast.supconlocal.strid"):
        resolve_settings({"nnunet_contrast": {"supconlocal": {"strid": 2}}}, ["base", "supconlocal_hu2021"])
    with pytest.raises(ValueError, match="must be of type int"):
        resolve_settings({"nnunet_contrast": {"budget": {"num_epochs": 2.5}}}, ["base"])


# ----------------------------------------------------------------------------- split
def nnunet_folds(n_cases=20, n_folds=2):
    keys = [f"case_{i:03d}" for i in range(n_cases)]
    return [{"train": [k for j, k in enumerate(keys) if j % n_folds != f],
             "val": [k for j, k in enumerate(keys) if j % n_folds == f]} for f in range(n_folds)]


@pytest.mark.parametrize("text, expected", [("0.05", 0.05), ("1.0", 1.0), ("10", 10), ("1", 1)])
def test_parse_labeled(text, expected):
    value = parse_labeled(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["0", "0.0", "1.5", "-0.1", "-3", "abc"])
def test_parse_labeled_rejects(text):
    with pytest.raises(UserInputError):
        parse_labeled(text)


def test_make_split_is_deterministic_nested_and_disjoint():
    folds = nnunet_folds()
    small, again = make_split(folds, 0.2, seed=3), make_split(folds, 0.2, seed=3)
    large, other_seed = make_split(folds, 0.5, seed=3), make_split(folds, 0.2, seed=4)
    assert small == again and small["format"] == SPLIT_FORMAT
    for f, fold in enumerate(small["folds"]):
        assert len(fold["labeled"]) == 2  # round(0.2 * 10)
        assert set(fold["labeled"]) <= set(large["folds"][f]["labeled"])
        assert set(fold["labeled"]) | set(fold["unlabeled"]) == set(folds[f]["train"])
        assert not set(fold["labeled"]) & set(fold["unlabeled"])
        assert not set(fold["labeled"]) & set(folds[f]["val"])
    assert small != other_seed
    assert [len(f["labeled"]) for f in make_split(folds, 3)["folds"]] == [3, 3]


def test_make_split_refuses_zero_labelled_or_too_many():
    with pytest.raises(UserInputError, match="zero labelled"):
        make_split(nnunet_folds(), 0.01)
    with pytest.raises(UserInputError, match="fewer than"):
        make_split(nnunet_folds(), 11)


def test_fold_split_checks_cases():
    folds = nnunet_folds()
    split = make_split(folds, 0.3)
    labeled, unlabeled = fold_split(split, 1, folds[1]["train"], "s.json")
    assert sorted(labeled + unlabeled) == sorted(folds[1]["train"])
    with pytest.raises(UserInputError, match="not training cases"):
        fold_split(split, 0, folds[0]["train"][1:], "s.json")
    with pytest.raises(UserInputError, match="no fold 5"):
        fold_split(split, 5, folds[0]["train"], "s.json")
    split["folds"][0]["labeled"] = []
    with pytest.raises(UserInputError, match="zero labelled"):
        fold_split(split, 0, folds[0]["train"], "s.json")
    with pytest.raises(UserInputError, match="not a nnunet-contrast split"):
        fold_split({"folds": []}, 0, [], "s.json")


# ----------------------------------------------------------------------------- plans presets
def fake_plans():
    return {"plans_name": "nnUNetPlans", "configurations": {"2d": {"batch_size": 58, "patch_size": [56, 40]},
                                                           "3d_fullres": {"batch_size": 9}}}


def test_build_plans_merges_presets_and_assignments():
    plans = build_plans(fake_plans(), ["cpu_budget"], ["nnunet_contrast.supconlocal.stride=2",
                                                       "nnunet_contrast.supconlocal.local_mode=stride"], "P")
    config = plans["configurations"]["2d"]
    preset = json.loads((bundled_dir("plans") / "cpu_budget.json").read_text())["configurations"]["2d"]
    assert plans["plans_name"] == "P" and config["batch_size"] == preset["batch_size"]
    assert config["patch_size"] == [56, 40]
    assert config["nnunet_contrast"]["supconlocal"] == {**preset["nnunet_contrast"]["supconlocal"], "stride": 2,
                                                        "local_mode": "stride"}
    assert plans["configurations"]["3d_fullres"] == {"batch_size": 9}


def test_build_plans_for_3d_fullres_takes_the_presets_settings_but_not_their_2d_keys():
    plans = build_plans(fake_plans(), ["cpu_budget"], ["nnunet_contrast.selftraining.ema_decay=0.99", "batch_size=2"],
                        "P", "3d_fullres")
    preset = json.loads((bundled_dir("plans") / "cpu_budget.json").read_text())["configurations"]["2d"]
    assert plans["configurations"]["2d"] == fake_plans()["configurations"]["2d"]
    config = plans["configurations"]["3d_fullres"]
    assert config["batch_size"] == 2 and "patch_size" not in config  # nnU-Net's 2d keys stay in 2d
    assert config["nnunet_contrast"]["budget"] == preset["nnunet_contrast"]["budget"]
    assert config["nnunet_contrast"]["selftraining"] == {"ema_decay": 0.99}


def test_a_presets_block_of_another_configuration_adds_to_its_2d_settings():
    preset = {"configurations": {"2d": {"batch_size": 16, "nnunet_contrast": {"budget": {"num_epochs": 5,
                                                                                          "save_every": 1}}},
                                 "3d_fullres": {"batch_size": 9, "nnunet_contrast": {"budget": {"num_epochs": 3}}}}}
    assert preset_configuration(preset, "2d") == preset["configurations"]["2d"]
    assert preset_configuration(preset, "3d_fullres") == {"batch_size": 9, "nnunet_contrast": {
        "budget": {"num_epochs": 3, "save_every": 1}}}
    assert preset_configuration(preset, "3d_lowres") == {"nnunet_contrast": {"budget": {"num_epochs": 5,
                                                                                        "save_every": 1}}}
    assert preset_configuration({"configurations": {}}, "3d_fullres") == {}


def test_build_plans_rejects_bad_settings():
    with pytest.raises(UserInputError, match="unknown setting"):
        build_plans(fake_plans(), [], ["nnunet_contrast.supconlocal.strides=2"], "P")
    with pytest.raises(UserInputError, match="batch_size"):
        build_plans(fake_plans(), [], ["batch_size=0"], "P")
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        parse_assignment("batch_size")


# ----------------------------------------------------------------------------- start-up hook
def test_autoload_appends_trainer_folder_and_keeps_user_paths(tmp_path):
    env = {"nnUNet_extTrainer": str(tmp_path)}
    _autoload.register_trainer_folder(env)
    _autoload.register_trainer_folder(env)  # idempotent
    parts = env["nnUNet_extTrainer"].split(os.pathsep)
    assert parts == [str(tmp_path), str(bundled_dir("trainers"))]
    empty = {}
    _autoload.register_trainer_folder(empty)
    assert empty["nnUNet_extTrainer"] == str(bundled_dir("trainers"))


def test_interpreter_start_sets_ext_trainer():
    """The installed .pth hook runs in every new interpreter (this is what nnUNetv2_train sees)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(bundled_dir("trainers"))


# ----------------------------------------------------------------------------- unlabelled files
def test_group_channel_files(tmp_path):
    for name in ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"]:
        (tmp_path / name).write_bytes(b"")
    cases = group_channel_files(tmp_path, ".nii.gz", 2)
    assert list(cases) == ["a", "b"] and [p.name for p in cases["a"]] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    with pytest.raises(UserInputError, match="channel"):
        group_channel_files(tmp_path, ".nii.gz", 1)
    (tmp_path / "c_0000.png").write_bytes(b"")
    with pytest.raises(UserInputError, match="file ending"):
        group_channel_files(tmp_path, ".nii.gz", 2)


def test_group_channel_files_rejects_bad_names_and_empty(tmp_path):
    with pytest.raises(UserInputError, match="no images"):
        group_channel_files(tmp_path, ".nii.gz", 1)
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(UserInputError, match="CASE_XXXX"):
        group_channel_files(tmp_path, ".nii.gz", 1)


# ----------------------------------------------------------------------------- progress.png
def test_progress_png_gets_a_contrast_panel(tmp_path):
    from nnunetv2.training.logging.nnunet_logger import LocalLogger
    from PIL import Image

    from nnunet_contrast.training.progress import ContrastLocalLogger

    plain, ours = LocalLogger(), ContrastLocalLogger(["global", "local", "finetune"], ["global_contrast", "local_contrast"])
    for epoch in range(3):
        for logger in (plain, ours):
            for key in ["mean_fg_dice", "train_losses", "val_losses", "lrs", "epoch_start_timestamps"]:
                logger.log(key, 0.1 * epoch, epoch)
            logger.log("ema_fg_dice", 0.1, epoch)
            logger.log("epoch_end_timestamps", 1.0 + epoch, epoch)
            logger.log("dice_per_class_or_region", [0.1], epoch)
        ours.log("global_contrast_loss", [4.0, float("nan"), float("nan")][epoch], epoch)
        ours.log("local_contrast_loss", [float("nan"), 3.0, float("nan")][epoch], epoch)
        ours.log("stage", epoch, epoch)
        ours.log("supervised", float(epoch == 2), epoch)
    (tmp_path / "plain").mkdir()
    (tmp_path / "ours").mkdir()
    plain.plot_progress_png(str(tmp_path / "plain"))
    ours.plot_progress_png(str(tmp_path / "ours"))
    with Image.open(tmp_path / "plain" / "progress.png") as a, Image.open(tmp_path / "ours" / "progress.png") as b:
        assert b.width == a.width and b.height > a.height


# ----------------------------------------------------------------------------- AMP safety
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_stay_float32_under_autocast(dtype):
    """Under mixed precision (CUDA's float16; bfloat16 on the CPU) the losses are computed in float32 and equal
    their float32 values."""
    from nnunet_contrast.losses import NTXentLoss, SupConLocalLoss

    torch.manual_seed(0)
    z0, z1 = torch.randn(6, 16), torch.randn(6, 16)
    features = torch.randn(4, 8, 12, 10)
    labels = torch.randint(0, 3, (4, 12, 10))
    losses = [lambda: NTXentLoss(0.5)(z0 @ torch.eye(16), z1 @ torch.eye(16))]
    losses += [lambda m=m: SupConLocalLoss(0.1, mode=m, block_size=4, chunk_size=16)(
        torch.nn.functional.conv2d(features, torch.eye(8)[:, :, None, None]), labels)
        for m in ("block", "stride", "exact", "full")]
    for loss in losses:
        reference = loss()
        with torch.autocast("cpu", dtype=dtype):
            mixed = loss()
        assert mixed.dtype == torch.float32
        # the inputs themselves pass through a low-precision matmul/conv; the losses add no further error
        torch.testing.assert_close(mixed, reference, rtol=2e-2, atol=2e-2)


def test_settings_value_rules():
    base = ["base", "supconlocal_hu2021"]
    for bad, message in [({"budget": {"save_every": 0}}, "at least 1"),
                         ({"supconlocal": {"local_mode": "blok"}}, "must be one of"),
                         ({"supconlocal": {"local_images": -3}}, "must not be negative"),
                         ({"semisup": {"unlabeled_batch_ratio": 0.0}}, "must be > 0"),
                         ({"supconlocall": {}}, "unknown setting nnunet_contrast.supconlocall"),
                         ({"run": {"seed": -2}}, "nnunet_contrast.run.seed must be at least -1"),
                         ({"run": {"finetune": "self"}}, "nnunet_contrast.run.finetune must be one of"),
                         ({"budget": {"save_every": True}}, "must be of type int")]:
        with pytest.raises(ValueError, match=message):
            resolve_settings({"nnunet_contrast": bad}, base)
    with pytest.raises(ValueError, match="mapping"):
        resolve_settings({"nnunet_contrast": 5}, base)


def test_build_plans_rejects_keys_outside_the_configuration():
    with pytest.raises(UserInputError, match="did you mean nnunet_contrast.supconlocal.stride=2"):
        build_plans(fake_plans(), [], ["supconlocal.stride=2"], "P")


def test_rotation_is_rigid_on_non_square_images():
    """A 90 degree rotation of a 40 x 20 image turns a centred 20-pixel bar into a centred
    20-pixel column: rigid in pixel space, not stretched to the other axis' length."""
    import math

    import torch.nn.functional as F
    from nnunet_contrast.data.views import affine_theta

    x = torch.zeros(1, 1, 40, 20)
    x[:, :, 19:21, :] = 1.0  # a horizontal bar through the centre, full width (20 px)
    theta = affine_theta(torch.tensor([math.pi / 2]), torch.ones(1), torch.ones(1), torch.zeros(1, 2), 40, 20)
    rotated = F.grid_sample(x, F.affine_grid(theta, [1, 1, 40, 20], align_corners=False), align_corners=False)
    column = rotated[0, 0, :, 9:11].sum(1)
    assert rotated[0, 0, :, 9:11].sum() > 0.8 * rotated.sum()  # all mass in the centre columns
    assert 18 <= int((column > 0.5).sum()) <= 22                # 20 px long, not 40


def test_3d_views_are_rigid_in_voxel_space_and_rotate_about_z_as_2d_views_do():
    import torch.nn.functional as F
    from nnunet_contrast.data.views import affine_theta, affine_theta_3d

    def warp(x, theta):
        return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    none, one, no_shift = torch.zeros(1, 3), torch.ones(1), torch.zeros(1, 3)
    x = torch.rand(1, 1, 8, 12, 10)
    torch.testing.assert_close(warp(x, affine_theta_3d(none, one, one, no_shift, 8, 12, 10)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(warp(x, affine_theta_3d(none, one, -one, no_shift, 8, 12, 10)), x.flip(-1), atol=1e-5,
                               rtol=0)
    about_z = affine_theta_3d(torch.tensor([[0.0, 0.0, 0.3]]), one * 1.1, -one, no_shift, 4, 40, 20)
    in_plane = affine_theta(torch.tensor([0.3]), one * 1.1, -one, torch.zeros(1, 2), 40, 20)
    torch.testing.assert_close(about_z[:, :2, :2], in_plane[:, :, :2])
    bar = torch.zeros(1, 1, 4, 40, 20)
    bar[..., 19:21, :] = 1.0  # along the width (20 px), rotated by 90 degrees about z: along the height, 20 px long
    rotated = warp(bar, affine_theta_3d(torch.tensor([[0.0, 0.0, math.pi / 2]]), one, one, no_shift, 4, 40, 20))
    assert rotated[..., 9:11].sum() > 0.8 * rotated.sum() and 18 <= int((rotated[0, 0, 1, :, 9:11].sum(1) > 0.5).sum()) <= 22
    assert spatial_view(torch.rand(2, 1, 8, 12, 10)).shape == (2, 1, 8, 12, 10)


# ----------------------------------------------------------------------------- demo arguments
@pytest.mark.parametrize("args, message", [(["--trainer", "nnUNetTrainerFoo"], "not a trainer of this project"),
                                           (["--labeled", "2.5"], "outside (0, 1]"),
                                           (["--set", "batch_size"], "KEY=VALUE")])
def test_demo_checks_its_arguments_before_any_work(args, message, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "nnunet-contrast"
    result = subprocess.run([str(cli), "demo", "--workdir", str(tmp_path / "w"), *args], capture_output=True,
                            text=True)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_a_trainer_without_a_3d_form_refuses_3d_plans_in_one_line():
    """``spatial_dims`` (every trainer of this project has both forms today): a method declared 2D-only is
    refused at start, before nnU-Net writes anything, in one line that names the 2d configuration."""
    from nnunet_contrast.training.semisup import SemiSupervisedTrainer

    class TwoDimensionalOnly(SemiSupervisedTrainer):
        spatial_dims = (2,)

    plans, dataset_json = sample_plans()
    assert TwoDimensionalOnly.check_supported(plans, "2d", dataset_json) is not None
    with pytest.raises(UserInputError, match=r"TwoDimensionalOnly has no 3D form yet, and '3d_fullres' is 3D: train "
                                             r"the 2d configuration \(nnUNetv2_train DATASET 2d FOLD -tr "
                                             r"TwoDimensionalOnly\)"):
        TwoDimensionalOnly.check_supported(plans, "3d_fullres", dataset_json)
    assert SemiSupervisedTrainer.check_supported(plans, "3d_fullres", dataset_json) is not None
