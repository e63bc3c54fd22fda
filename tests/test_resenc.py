"""nnU-Net's residual-encoder plans (``nnUNetPlannerResEncM``, recommended by nnU-Net since 2024) on the embedded
sample: every trainer builds its network, taps, heads and second decoder on the ResidualEncoderUNet and takes a
training step of each of its stages in 2d; each stage's terms in 3d_fullres on ResEnc: test_3d.py's hidden-label
tests (SelfTraining's compiled step: test_cuda_paths.py).
The EMA teacher on these networks: test_ema_teacher.py."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import (RESENC, RESENC_PLANS, RESENC_PLANS_3D, every_stage_once, make_trainer, ready_trainer,
                      train_each_stage_once)
from nnunet_contrast.commands.cli import project_trainers

# every piece a trainer adds to nnU-Net: its method's stages and heads (the `...SelfTraining` variants put the
# self-training stage, which SelfTraining has, after the same stages)
# (CopyPaste and GlobalContrast reach the network as SelfTraining and GlobalLocalContrast do: other settings of the
# same steps)
SAME_STEPS = ("nnUNetTrainerCopyPaste", "nnUNetTrainerGlobalContrast")
TRAINERS_2D = [t for t in project_trainers() if (not t.endswith("SelfTraining") or t == "nnUNetTrainerSelfTraining")
               and t not in SAME_STEPS]


@pytest.mark.parametrize("trainer", TRAINERS_2D)
def test_every_trainer_trains_each_stage_on_resenc_2d(preprocessed_3d, trainer):
    """A real step of each stage (forward, backward, the stage's optimizer) on the residual encoder."""
    built = ready_trainer(trainer, RESENC_PLANS, "2d")
    assert type(built.network).__name__ in RESENC
    train_each_stage_once(built)


@pytest.mark.parametrize("plans, configuration, image_shape", [(RESENC_PLANS, "2d", (3, 60, 45)),
                                                              (RESENC_PLANS_3D, "3d_fullres", (36, 50, 35))])
def test_nnunets_predictor_averages_ideals_two_decoders_on_resenc(preprocessed_3d, plans, configuration, image_shape):
    """What nnUNetv2_predict does with an IDEAL checkpoint of ResEnc plans: nnU-Net's predictor builds the network
    through the trainer class (encoder, nnU-Net's decoder and the second decoder) and loads the checkpoint."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer = ready_trainer("nnUNetTrainerIDEAL", plans, configuration)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    for name, content in (("plans.json", trainer.plans_manager.plans), ("dataset.json", trainer.dataset_json)):
        (Path(trainer.output_folder_base) / name).write_text(json.dumps(content))
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trainer.output_folder_base, (0,), "checkpoint_final.pth")
    assert type(predictor.network).__name__ == "DualDecoderUNet"
    assert type(predictor.network.encoder).__name__ == "ResidualEncoder"
    logits = predictor.predict_sliding_window_return_logits(torch.randn(1, *image_shape))
    assert logits.shape == (3, *image_shape) and torch.isfinite(logits).all()
    trainer.on_train_end()


def test_a_joint_methods_self_training_variant_runs_each_stage_on_resenc_2d(preprocessed_3d):
    """IDEALSelfTraining: the pseudo-label term joins IDEAL's fine-tuning, its EMA teacher a copy of the two-decoder
    network on the residual encoder (the other variants put SelfTraining's stages, run above, after the method's)."""
    terms = every_stage_once("nnUNetTrainerIDEALSelfTraining", RESENC_PLANS, "2d", RESENC)
    assert {"segmentation", "cross_pseudo_supervision", "pseudo_label"} <= terms["finetune"].keys()
    assert all(math.isfinite(v) for stage in terms.values() for v in stage.values()), terms


@pytest.mark.parametrize("trainer", project_trainers())
def test_every_trainer_builds_its_3d_network_and_heads_on_resenc(preprocessed_3d, trainer):
    """Every trainer and variant, the ones whose steps run above through a sibling's included."""
    built = make_trainer(trainer, RESENC_PLANS_3D, configuration="3d_fullres")
    built.initialize()
    assert type(built.network).__name__ in RESENC and built.network.encoder.conv_op.__name__ == "Conv3d"
    assert type(built.network.encoder).__name__ == "ResidualEncoder"
    for head in getattr(built, "heads", {}).values():
        convolutions = [m for m in head.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
        assert all(isinstance(m, torch.nn.Conv3d) for m in convolutions), head
