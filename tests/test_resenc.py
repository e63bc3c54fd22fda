"""nnU-Net's residual-encoder plans (``nnUNetPlannerResEncM``, recommended by nnU-Net since 2024) on the embedded
sample: every trainer builds its network, taps, heads and second decoder on the ResidualEncoderUNet and takes a
step of each of its stages, in 2d and, where it has a 3D form, in 3d_fullres. The EMA teacher on these networks:
test_ema_teacher.py."""
import math

import pytest
import torch

from conftest import RESENC_PLANS, RESENC_PLANS_3D, ready_trainer, seed_everything, stage_terms
from nnunet_contrast.commands.cli import project_trainers

# every piece a trainer adds to nnU-Net: its method's stages and heads (the `...SelfTraining` variants put the
# self-training stage, which SelfTraining has, after the same stages)
TRAINERS_2D = [t for t in project_trainers() if not t.endswith("SelfTraining") or t == "nnUNetTrainerSelfTraining"]
TRAINERS_3D = ["nnUNetTrainerLabeledOnly", "nnUNetTrainerSelfTraining", "nnUNetTrainerCopyPaste"]


def every_stage_once(trainer_name: str, plans: str, configuration: str) -> dict:
    """Each loss term of each stage of the trainer on a batch of the stage's own loader (stage -> term -> value)."""
    trainer = ready_trainer(trainer_name, plans, configuration)
    assert type(trainer.network).__name__ in ("ResidualEncoderUNet", "DualDecoderUNet")
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


@pytest.mark.parametrize("trainer", TRAINERS_2D)
def test_every_trainer_runs_each_stage_on_resenc_2d(preprocessed_3d, trainer):
    terms = every_stage_once(trainer, RESENC_PLANS, "2d")
    assert all(math.isfinite(v) for stage in terms.values() for v in stage.values()), terms


@pytest.mark.parametrize("trainer", TRAINERS_3D)
def test_trainers_with_a_3d_form_run_each_stage_on_resenc_3d_fullres(preprocessed_3d, trainer):
    terms = every_stage_once(trainer, RESENC_PLANS_3D, "3d_fullres")
    assert all(math.isfinite(v) for stage in terms.values() for v in stage.values()), terms
