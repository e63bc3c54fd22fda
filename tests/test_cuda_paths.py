"""What a CUDA run does differently, emulated on the CPU: nnU-Net compiles the network (``torch.compile`` in its
``initialize`` when ``_do_i_compile``), our steps run under autocast, and nnU-Net's GradScaler scales the losses.
Every kind of stage takes one real step with nnU-Net's compile path forced and the CPU's autocast (bfloat16) in
our steps, in 2d; IDEAL and SelfTraining also in 3d_fullres; and one trainer of each step kind steps through a
CPU GradScaler under float16 autocast. (That each loss computes in float32 from float16 and bfloat16 inputs:
the loss tests.)

The compiler backend is ``aot_eager`` by default: TorchDynamo traces the network and AOTAutograd builds its
forward and backward graphs, as for inductor, without inductor's C++ code generation (on this project's 2-core
machine, beside a benchmark: 99 s for the first step of the 2D U-Net, forward and backward, and 169 s more for
a second batch size). ``NNUNET_CONTRAST_COMPILE_BACKEND=inductor`` runs nnU-Net's own backend here for all of
them; one self-training step always runs with it;
``benchmarks/gpu_check.py`` runs it on CUDA with float16 autocast. Each compiled trainer records the graphs the
backend compiled, and whether the CPU's autocast was on as it did: a network that silently ran uncompiled (for
example past TorchDynamo's recompile limit) fails the test."""
import functools
import math
import os
import shutil

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from conftest import (PLAIN, PLANS_3D, RESENC, RESENC_PLANS_3D, TEST_PLANS, make_trainer, ready_trainer,
                      seed_everything, train_each_stage_once)

BACKEND = os.environ.get("NNUNET_CONTRAST_COMPILE_BACKEND", "aot_eager")
# one trainer of each kind of stage, and where its steps run the compiled network: None, nowhere; False, in
# nnU-Net's own step only (without autocast on the CPU), its own steps reading decoder features or running encoder
# and decoder apart through the plain module (a compiled graph does not run forward hooks registered after its
# compilation); True, in one of its own steps, under autocast
TRAINERS = {
    "nnUNetTrainerSupConLocal": False,  # global contrast (encoder tap, head), local contrast (decoder tap), nnU-Net
    "nnUNetTrainerGlobalContrast": False,  # G^R on every case's images
    "nnUNetTrainerGlobalLocalContrast": False,  # G^D on partitions, L^R on the first decoder blocks, encoder frozen
    "nnUNetTrainerPseudoLabelContrast": False,  # the snapshot labeller, contrast on decoder features of both batches
    "nnUNetTrainerCrossLevel": True,  # the network on sub-patches of other shapes: a second graph
    "nnUNetTrainerIDEAL": True,  # dense contrast (plain), then both decoders on the shared encoder (compiled)
    "nnUNetTrainerIDEALSelfTraining": True,  # the EMA teacher of the two-decoder network joins the fine-tuning
    "nnUNetTrainerSelfTraining": True,  # the EMA teacher's copy of the network, the student's CutMix batch
    "nnUNetTrainerCopyPaste": True,  # labelled structures pasted into unlabelled images
}
# in 3D: the 3D second decoder (IDEAL, default plans) and the teacher with 3D CutMix boxes (ResEnc plans: this is
# SelfTraining's step on ResEnc 3D, which test_resenc.py leaves to it)
TRAINERS_3D = [("nnUNetTrainerIDEAL", PLANS_3D, PLAIN), ("nnUNetTrainerSelfTraining", RESENC_PLANS_3D, RESENC)]


def compiled_trainer(name: str, monkeypatch, plans: str = TEST_PLANS, configuration: str = "2d",
                     backend: str = BACKEND):
    """The trainer initialised through nnU-Net's compile path (as on CUDA), its steps under CPU autocast; its
    ``compiled`` lists, per graph the backend compiled, whether autocast was on."""
    seed_everything(0)
    torch._dynamo.reset()  # each trainer compiles afresh, far from the recompile limit
    compiled = []

    def recording_backend(graph, example_inputs):
        compiled.append(torch.is_autocast_enabled("cpu"))
        return lookup_backend(backend)(graph, example_inputs)

    trainer = make_trainer(name, plans, configuration=configuration)
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording_backend))
    trainer.initialize()
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "autocast_context", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.compiled = compiled
    return trainer


@pytest.mark.parametrize("trainer_name", TRAINERS)
def test_every_stage_steps_with_a_compiled_network_under_autocast(hippocampus, monkeypatch, trainer_name):
    trainer = compiled_trainer(trainer_name, monkeypatch)
    assert type(trainer.network).__name__ == "OptimizedModule"
    train_each_stage_once(trainer)
    assert compiled_where(trainer) == TRAINERS[trainer_name], trainer.compiled


def test_the_self_training_step_compiles_with_nnunets_own_backend(hippocampus, monkeypatch):
    """inductor, nnU-Net's backend (``torch.compile``'s default), generating C++ for the CPU: the student's and the
    teacher's forward passes of one self-training step, under autocast (the stage whose own step runs the
    compiled network; the other tests use aot_eager, which traces the same graphs without generating code)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"inductor generates C++ on the CPU and finds no compiler here ({compiler} is not on PATH; set CXX)")
    trainer = compiled_trainer("nnUNetTrainerSelfTraining", monkeypatch, backend="inductor")
    try:
        index = trainer.schedule.index_of("selftrain")
        trainer.current_epoch = trainer.schedule.starts[index]
        trainer.start_stage_epoch(index)
        values = {k: float(v) for k, v in trainer.train_step(next(trainer.dataloader_train)).items()}
    finally:
        trainer.on_train_end()
    assert all(math.isfinite(v) for v in values.values()) and values["pseudo_label"] > 0, values
    assert compiled_where(trainer) is True, trainer.compiled


def compiled_where(trainer):
    """None: no compiled graph ran; True: one compiled under autocast (in our steps); False: only without."""
    return any(trainer.compiled) if trainer.compiled else None


class CountingScaler(torch.amp.GradScaler):
    """nnU-Net's GradScaler on the CPU, counting its updates (one per optimizer step it took part in)."""
    updates = 0

    def update(self, new_scale=None):
        self.updates += 1
        super().update(new_scale)


# our optimizer step in a method's stages and in the self-training step; nnU-Net's own in fine-tuning
@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerSupConLocal", "nnUNetTrainerSelfTraining"])
def test_every_stage_steps_through_nnunets_grad_scaler_under_float16_autocast(hippocampus, monkeypatch, trainer_name):
    trainer = ready_trainer(trainer_name, TEST_PLANS)
    # a small first scale: float16 gradients of the default 2^16 can overflow in one step, which the scaler
    # answers by skipping it, and this test asks that every stage's step changes the weights
    trainer.grad_scaler = CountingScaler("cpu", init_scale=2.0 ** 4)
    monkeypatch.setattr(trainer, "autocast_context", lambda: torch.autocast("cpu", dtype=torch.float16))
    train_each_stage_once(trainer)
    assert trainer.grad_scaler.updates == len(trainer.schedule.stages)


@pytest.mark.parametrize("trainer_name, plans, networks", TRAINERS_3D)
def test_every_stage_steps_in_3d_with_a_compiled_network_under_autocast(preprocessed_3d, monkeypatch, trainer_name,
                                                                        plans, networks):
    trainer = compiled_trainer(trainer_name, monkeypatch, plans, "3d_fullres")
    assert type(trainer.network._orig_mod).__name__ in networks
    assert trainer.network._orig_mod.encoder.conv_op.__name__ == "Conv3d"  # compiled: _orig_mod
    train_each_stage_once(trainer)
    assert compiled_where(trainer) == TRAINERS[trainer_name], trainer.compiled
