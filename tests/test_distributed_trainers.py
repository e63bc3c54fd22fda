"""Trainers under DDP, on 2 CPU processes joined by gloo and built as nnU-Net's ``-num_gpus`` path builds
them (issue 15). nnU-Net wraps the network in ``DDP(network, device_ids=[rank])``, which is for CUDA only:
the ranks wrap it without device ids, the one change to nnU-Net's path.

One training step of each stage kind on half of a global batch per rank gives every trained parameter the
gradient of one process on the whole batch; the ranks' network, heads and teacher stay identical over steps;
the ranks draw different unlabelled batches."""
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from nnunetv2.run.run_training import maybe_load_checkpoint

from conftest import StopTraining, make_plans, make_trainer, ready_trainer, stop_after_epoch_end, trained_state
from distributed_harness import run_ranks
from nnunet_contrast.network.taps import unwrap_network

TOLERANCE = 1e-5
# deterministic steps: both views fixed (below), no mixing or intensity perturbation, every pixel kept, all
# labelled images in the local stage (its default takes the last ones of each rank's batch)
DETERMINISTIC = ["nnunet_contrast.supconlocal.local_images=0", "nnunet_contrast.selftraining.mixing=none",
                 "nnunet_contrast.selftraining.strong_intensity=false",
                 "nnunet_contrast.selftraining.confidence_threshold=0.0", "nnunet_contrast.run.seed=0"]
STAGES = [("nnUNetTrainerSupConLocal", "global"),  # pretraining: NT-Xent gathered over ranks, encoder and head
          ("nnUNetTrainerSupConLocal", "local"),   # supervised local contrast gathered, network and dense head
          # the last local_images of the global batch of 4: both on rank 1 (rank 0 joins with none), then 2 + 1
          ("nnUNetTrainerSupConLocal", "local", "local_images=2"),
          ("nnUNetTrainerSupConLocal", "local", "local_images=3"),
          ("nnUNetTrainerSupConLocal", "finetune"),  # nnU-Net's own step: DDP's own hooks
          ("nnUNetTrainerIDEAL", "finetune"),  # joint: both decoders, cross pseudo-supervision on unlabelled images
          ("nnUNetTrainerSelfTraining", "selftrain")]  # EMA teacher, pseudo-labels, masked nnU-Net loss


def with_method_setting(trainer, case: tuple):
    """The trainer with the case's method setting (``name=value``, an int), if it names one."""
    if len(case) > 2:
        name, value = case[2].split("=")
        trainer.method_settings = dataclasses.replace(trainer.method_settings, **{name: int(value)})
    return trainer


def cpu_ddp(module, device_ids=None, **kwargs):
    return DistributedDataParallel(module, **kwargs)


def fixed_views(images, spatial):
    return images.flip(-1), 0.8 * images + 0.1


def patch_for_cpu_ranks(views=None):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer
    import nnunet_contrast.training.step as step

    nnunet_trainer.DDP = cpu_ddp
    if views is not None:
        step.two_views = views


def split_batch(batch: dict, rank: int, world: int) -> dict:
    def part(value):
        if isinstance(value, (list, tuple)):
            return [part(v) for v in value]
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return value[rank * len(value) // world:(rank + 1) * len(value) // world]
        return value
    return {key: part(value) for key, value in batch.items()}


def trained_parts(trainer):
    parts = {f"network.{n}": p for n, p in unwrap_network(trainer.network).named_parameters()}
    return {**parts, **{f"heads.{n}": p for n, p in trainer.heads.named_parameters()}}


def one_step(trainer, stage_name: str, batch: dict, unlabeled, weights: dict) -> dict:
    """The gradients of one ``train_step`` of stage ``stage_name`` from ``weights``. Our own steps run in
    float64: an argmax (cross pseudo-supervision, pseudo-labels) of nearly tied logits of the untrained
    network could otherwise flip between a batch of 8 and one of 4, by float32 rounding alone."""
    index = trainer.schedule.index_of(stage_name)
    if not trainer.schedule.stages[index].is_nnunet_step:  # nnU-Net's step: DDP's float32 gradient buckets
        unwrap_network(trainer.network).double()
        trainer.heads.double()
        batch, unlabeled = {**batch, "data": batch["data"].double()}, None if unlabeled is None else unlabeled.double()
    unwrap_network(trainer.network).load_state_dict(weights["network"])
    trainer.heads.load_state_dict(weights["heads"])
    trainer.current_epoch = trainer.schedule.starts[index]
    trainer.start_stage_epoch(index)
    trainer.next_unlabeled_images = lambda: unlabeled
    trainer.train_step(batch)
    # a parameter the step does not reach has no gradient on one process, zeros after averaging over ranks
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in trained_parts(trainer).items()}


def rank_steps(rank, world, env, plans, cases):
    """``one_step`` of every case, on this rank's half of its batch, each in a trainer of its own."""
    os.environ.update(env)
    patch_for_cpu_ranks(fixed_views)
    results = {}
    for case, (batch, unlabeled, weights) in cases.items():
        trainer = make_trainer(case[0], plans)
        trainer.initialize()
        trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
        half = None if unlabeled is None else split_batch({"u": unlabeled}, rank, world)["u"]
        results[case] = one_step(with_method_setting(trainer, case), case[1], split_batch(batch, rank, world), half,
                                 weights)
    return results


@pytest.fixture(scope="module")
def stage_steps(hippocampus, tmp_path_factory):
    """Per case of ``STAGES``: one process's gradients on the whole batch, and each rank's."""
    import nnunet_contrast.training.step as step

    plans = make_plans(hippocampus, "nnUNetPlans_ddp", *DETERMINISTIC)
    inputs, expected = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "two_views", fixed_views)
        for case in STAGES:
            trainer_name, stage_name = case[:2]
            reference = with_method_setting(ready_trainer(trainer_name, plans), case)
            stage = reference.schedule.stage(stage_name)
            batch = next(reference.stage_loader(stage))
            unlabeled = reference.next_unlabeled_images() if stage.reads_unlabeled else None
            weights = {"network": {k: v.clone() for k, v in unwrap_network(reference.network).state_dict().items()},
                       "heads": {k: v.clone() for k, v in reference.heads.state_dict().items()}}
            inputs[case] = (batch, unlabeled, weights)
            expected[case] = one_step(reference, stage_name, batch, unlabeled, weights)
    ranks = run_ranks(rank_steps, tmp_path_factory.mktemp("ranks"), dict(hippocampus.env), plans, inputs)
    return expected, ranks


@pytest.mark.parametrize("case", STAGES, ids=lambda case: "-".join(case))
def test_one_step_on_two_ranks_gives_the_gradients_of_one_process_on_the_whole_batch(stage_steps, case):
    expected, ranks = stage_steps
    assert any(grad.abs().sum() > 0 for grad in expected[case].values())
    for name, grad in expected[case].items():
        for rank in ranks:
            assert torch.allclose(rank[case][name], grad, atol=TOLERANCE), (name, (rank[case][name] - grad).abs().max())


# ----------------------------------------------------------------------------- several steps, and --c
RESUMED = ["nnunet_contrast.run.seed=0", "nnunet_contrast.budget.num_epochs=4",
           "nnunet_contrast.selftraining.warmup_fraction=0.25"]  # global, local, warm-up, then 3 self-training epochs
STOP_AFTER = 5  # in the second self-training epoch: the teacher and the ramp are in the checkpoint


def recording_unlabeled_batches(trainer, drawn: list) -> None:
    draw = trainer.next_unlabeled_images

    def next_unlabeled_images():
        images = draw()
        drawn.append(images.clone())
        return images
    trainer.next_unlabeled_images = next_unlabeled_images


def rank_train_stop_resume(rank, world, env, trainer_name, plans):
    """The run uninterrupted, then stopped after ``STOP_AFTER`` epochs and continued as ``--c`` does."""
    import torch.distributed as dist

    os.environ.update(env)
    patch_for_cpu_ranks()
    uninterrupted, drawn = make_trainer(trainer_name, plans), []
    uninterrupted.on_train_start = with_recorder(uninterrupted, drawn)
    uninterrupted.run_training()
    expected = trained_state(uninterrupted)
    dist.barrier()
    if rank == 0:
        Path(uninterrupted.output_folder, "checkpoint_final.pth").unlink()  # --c would take it first
    dist.barrier()
    stopped = make_trainer(trainer_name, plans)
    stop_after_epoch_end(stopped, STOP_AFTER)
    try:
        stopped.run_training()
    except StopTraining:
        pass
    resumed = make_trainer(trainer_name, plans)
    maybe_load_checkpoint(resumed, True, False)
    epoch_resumed = resumed.current_epoch
    resumed.run_training()
    return {"expected": expected, "resumed": trained_state(resumed), "epoch_resumed": epoch_resumed,
            "first_unlabeled": drawn[0], "batch_size": resumed.batch_size,
            "unlabeled_batch_ratio": resumed.settings.semisup.unlabeled_batch_ratio}


def with_recorder(trainer, drawn):
    start = trainer.on_train_start

    def on_train_start():
        start()
        recording_unlabeled_batches(trainer, drawn)
    return on_train_start


@pytest.fixture(scope="module")
def two_rank_run(hippocampus, tmp_path_factory):
    plans = make_plans(hippocampus, "nnUNetPlans_ddp_resume", *RESUMED)
    return run_ranks(rank_train_stop_resume, tmp_path_factory.mktemp("ranks"), dict(hippocampus.env),
                     "nnUNetTrainerSupConLocalSelfTraining", plans)


def test_ranks_keep_identical_network_heads_and_teacher_while_drawing_different_unlabelled_batches(two_rank_run):
    first, second = two_rank_run
    assert any(key.startswith("teacher.") for key in first["expected"]) and \
        any(key.startswith("heads.") for key in first["expected"])
    for key, value in first["expected"].items():
        assert torch.equal(value, second["expected"][key]), key
    # nnU-Net splits the plans' batch of 4 into 2 per rank; the unlabelled batch (ratio x 2) follows it
    ratio = first["unlabeled_batch_ratio"]
    assert first["batch_size"] == second["batch_size"] == 2
    assert first["first_unlabeled"].shape[0] == second["first_unlabeled"].shape[0] == max(1, round(2 * ratio))
    assert not torch.equal(first["first_unlabeled"], second["first_unlabeled"])


def test_a_run_resumed_on_two_ranks_ends_as_the_uninterrupted_one(two_rank_run):
    for rank in two_rank_run:
        assert rank["epoch_resumed"] == STOP_AFTER
        for key, value in rank["expected"].items():
            assert torch.equal(rank["resumed"][key], value), key
