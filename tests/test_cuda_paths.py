"""What a CUDA run does differently, emulated on the CPU: nnU-Net compiles the network (``torch.compile`` in its
``initialize`` when ``_do_i_compile``) and our steps run under autocast. Three trainers whose steps reach into the network
take one real step of each of their stages with nnU-Net's compile path forced and the CPU's autocast (bfloat16)
in our steps, in 2d; IDEAL and SelfTraining also in 3d_fullres. (That each loss computes in float32 from float16 and bfloat16 inputs: the loss tests.)

The compiler backend is ``aot_eager`` by default: TorchDynamo traces the network and AOTAutograd builds its
forward and backward graphs, as for inductor, without inductor's C++ code generation (on this project's 2-core
machine, beside a benchmark: 99 s for the first step of the 2D U-Net, forward and backward, and 169 s more for
a second batch size). ``NNUNET_CONTRAST_COMPILE_BACKEND=inductor`` runs nnU-Net's own backend here;
``benchmarks/gpu_check.py`` runs it on CUDA with float16 autocast."""
import functools
import math
import os

import pytest
import torch

from conftest import PLAIN, PLANS_3D, RESENC, RESENC_PLANS_3D, TEST_PLANS, make_trainer, seed_everything
from nnunet_contrast.training.schedule import ENCODER, NETWORK

BACKEND = os.environ.get("NNUNET_CONTRAST_COMPILE_BACKEND", "aot_eager")
# the trainers whose steps reach into the compiled network: feature taps and heads (SupConLocal: global, local
# and nnU-Net's step), a second decoder on the shared encoder (IDEAL), the EMA teacher's copy of the network and
# the student's mixed batch (SelfTraining); the other trainers use the same taps
TRAINERS = ["nnUNetTrainerSupConLocal", "nnUNetTrainerIDEAL", "nnUNetTrainerSelfTraining"]
# in 3D: the 3D second decoder (IDEAL, default plans) and the teacher with 3D CutMix boxes (ResEnc plans: this is
# SelfTraining's step on ResEnc 3D, which test_resenc.py leaves to it)
TRAINERS_3D = [("nnUNetTrainerIDEAL", PLANS_3D, PLAIN), ("nnUNetTrainerSelfTraining", RESENC_PLANS_3D, RESENC)]


def compiled_trainer(name: str, monkeypatch, plans: str = TEST_PLANS, configuration: str = "2d"):
    """The trainer initialised through nnU-Net's compile path (as on CUDA), its steps under CPU autocast."""
    seed_everything(0)
    trainer = make_trainer(name, plans, configuration=configuration)
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=BACKEND))
    trainer.initialize()
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "autocast_context", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    return trainer


@pytest.mark.parametrize("trainer_name", TRAINERS)
def test_every_stage_steps_with_a_compiled_network_under_autocast(hippocampus, monkeypatch, trainer_name):
    every_stage_steps(compiled_trainer(trainer_name, monkeypatch))


@pytest.mark.parametrize("trainer_name, plans, networks", TRAINERS_3D)
def test_every_stage_steps_in_3d_with_a_compiled_network_under_autocast(preprocessed_3d, monkeypatch, trainer_name,
                                                                        plans, networks):
    trainer = compiled_trainer(trainer_name, monkeypatch, plans, "3d_fullres")
    assert type(trainer.network._orig_mod).__name__ in networks
    assert trainer.network._orig_mod.encoder.conv_op.__name__ == "Conv3d"
    every_stage_steps(trainer)


def every_stage_steps(trainer) -> None:
    """One step of each stage: finite terms and weights, and the weights of what the stage trains changed."""
    assert type(trainer.network).__name__ == "OptimizedModule"
    try:
        for index, stage in enumerate(trainer.schedule.stages):
            trainer.current_epoch = trainer.schedule.starts[index]
            trainer.start_stage_epoch(index)
            before = [p.detach().clone() for p in trainer.network.parameters()]
            output = trainer.train_step(next(trainer.dataloader_train))
            values = {k: float(v) for k, v in output.items()}
            assert all(math.isfinite(v) for v in values.values()), (stage.name, values)
            after = list(trainer.network.parameters())
            assert all(torch.isfinite(p).all() for p in after)
            if {NETWORK, ENCODER} & set(stage.trains):
                assert any(not torch.equal(b, a) for b, a in zip(before, after)), stage.name
    finally:
        trainer.on_train_end()
