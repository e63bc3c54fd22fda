"""Seconds per training iteration of each stage of every method trainer against
nnUNetTrainerLabeledOnly at the same batch size, measured side by side in one process.

All trainers are built on the same prepared dataset (embedded sample by default), with nnU-Net's
background data augmentation; an iteration is ``train_step(next(dataloader_train))`` exactly as in
nnU-Net's loop. Rounds alternate between the cases so that machine load hits all of them alike.
What a step holds follows each method's own defaults (not the CPU preset's), except that every
batch, including the pretraining batches of the global/local trainers, is ``--batch`` images.

    python benchmarks/stage_timing.py [--batch 32] [--iterations 10] [--rounds 3] [--workdir DIR]
        [--only SupConLocal PseudoLabel GlobalLocal CrossLevel IDEAL SelfTraining]
"""
import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnunet_contrast.training.schedule import Schedule

FAMILIES = ("SupConLocal", "PseudoLabel", "GlobalLocal", "CrossLevel", "IDEAL", "SelfTraining")


def build(trainer_name: str, plans: str):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args("4", "2d", 0, trainer_name, plans, False, torch.device("cpu"))
    trainer.on_train_start()
    trainer.network.train()
    return trainer


def seconds_per_iteration(trainer, iterations: int) -> float:
    trainer.train_step(next(trainer.dataloader_train))  # warm-up
    started = time.perf_counter()
    for _ in range(iterations):
        trainer.train_step(next(trainer.dataloader_train))
    return (time.perf_counter() - started) / iterations


def at_stage(trainer, name: str, **settings):
    """Setup of the first stage called ``name``, entered as nnU-Net's loop enters it (its optimizer,
    loader and iterations from the trainer's schedule), with some method settings changed."""
    def setup():
        if settings:
            trainer.method_settings = dataclasses.replace(trainer.method_settings, **settings)
            trainer.schedule = Schedule(trainer.with_finetune_setting(trainer.build_schedule()))
        index = trainer.schedule.index_of(name)
        trainer.current_epoch, trainer.stage_index = trainer.schedule.starts[index], None
        trainer.start_stage_epoch(index)  # nnU-Net's own epoch start would log out of order here
        trainer.heads.train()
        return trainer
    return setup


def every_stage(trainer, label: str) -> dict:
    """One case per stage of the trainer's schedule."""
    return {f"{label} {name}": at_stage(trainer, name) for name in trainer.schedule.names}


def supconlocal_cases(plans):
    from nnunet_contrast.losses import SupConLocalLoss
    method = build("nnUNetTrainerSupConLocal", plans)
    s = method.method_settings

    def local(mode):
        def setup():
            at_stage(method, "local")()
            method.local_loss = SupConLocalLoss(s.local_temperature, mode, s.stride, s.block_size, s.local_form,
                                                chunk_size=s.chunk_size)
            return method
        return setup

    cases = every_stage(method, "SupConLocal")
    cases["SupConLocal local"] = local("block")  # the default, measured with the loss rebuilt as below
    cases.update({"SupConLocal local, stride 4": local("stride"), "SupConLocal local, exact": local("exact")})
    return cases, [method]


def pseudolabel_cases(plans):
    intra, inter = build("nnUNetTrainerPseudoLabelContrast", plans), build("nnUNetTrainerPseudoLabelContrastInter",
                                                                          plans)
    return {**every_stage(intra, "PseudoLabelContrast"),
            "PseudoLabelContrastInter joint, inter": at_stage(inter, "joint")}, [intra, inter]


def globallocal_cases(plans):
    method = build("nnUNetTrainerGlobalLocalContrast", plans)
    cases = {"GlobalLocalContrast global, G^D (default)": at_stage(method, "global", global_strategy="GD"),
             "GlobalLocalContrast global, G^R (= GlobalContrast)": at_stage(method, "global", global_strategy="GR"),
             "GlobalLocalContrast local, L^R (default)": at_stage(method, "local", local_strategy="LR"),
             "GlobalLocalContrast local, L^D": at_stage(method, "local", local_strategy="LD"),
             "GlobalLocalContrast finetune": at_stage(method, "finetune")}
    return cases, [method]


def crosslevel_cases(plans):
    method = build("nnUNetTrainerCrossLevel", plans)
    return every_stage(method, "CrossLevel"), [method]


def ideal_cases(plans):
    method = build("nnUNetTrainerIDEAL", plans)
    cases = {"IDEAL dense, all positions (default)": at_stage(method, "dense", sampled_positions=0),
             "IDEAL dense, 256 sampled positions": at_stage(method, "dense", sampled_positions=256),
             "IDEAL finetune (two decoders, cross pseudo-supervision)": at_stage(method, "finetune")}
    return cases, [method]


def selftraining_cases(plans):
    """The self-training stage (EMA teacher's pass, the student's pass over labelled + unlabelled images)
    with CutMix and with copy-paste, and on top of PseudoLabelContrast's joint training."""
    cutmix, copypaste = build("nnUNetTrainerSelfTraining", plans), build("nnUNetTrainerCopyPaste", plans)
    joint = build("nnUNetTrainerPseudoLabelContrastSelfTraining", plans)
    cases = {"SelfTraining selftrain (CutMix)": at_stage(cutmix, "selftrain"),
             "CopyPaste selftrain (copy-paste)": at_stage(copypaste, "selftrain"),
             "PseudoLabelContrastSelfTraining joint": at_stage(joint, "joint")}
    return cases, [cutmix, copypaste, joint]


def shut_down(trainer):
    for loader in {id(x): x for x in (getattr(trainer, "dataloader_labeled", None), trainer.dataloader_train,
                                      trainer.dataloader_val)}.values():
        getattr(loader, "_finish", lambda: None)()
    for loader in [getattr(trainer, "dataloader_unlabeled", None)] + list(getattr(trainer, "extra_loaders",
                                                                                  lambda: [])()):
        if loader is not None:
            loader.finish()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="prepared dataset folder (reused if present)")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    args = parser.parse_args()
    from nnunet_contrast.commands.demo import prepare_dataset
    from nnunet_contrast.settings import preset_settings

    root = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet_contrast_bench_"))
    plans = f"nnUNetPlans_bench{args.batch}"
    # the methods' own defaults (not the CPU preset's) for what a step processes; only the batch is set
    base = preset_settings(["base"])
    supcon = preset_settings(["supconlocal_hu2021"])["supconlocal"]  # the preset's values, before any --set
    sets = [f"batch_size={args.batch}",
            f"nnunet_contrast.semisup.unlabeled_batch_ratio={base['semisup']['unlabeled_batch_ratio']}",
            f"nnunet_contrast.supconlocal.local_images={supcon['local_images']}",
            f"nnunet_contrast.globallocal.pretrain_batch_size={args.batch}"]
    env = prepare_dataset(root, "0.25", sets, plans=plans)
    os.environ.update(env)
    torch.set_num_threads(os.cpu_count())
    baseline = build("nnUNetTrainerLabeledOnly", plans)
    cases, trainers = {"LabeledOnly (nnU-Net step)": lambda: baseline}, [baseline]
    makers = (supconlocal_cases, pseudolabel_cases, globallocal_cases, crosslevel_cases, ideal_cases,
              selftraining_cases)
    for family, make in zip(FAMILIES, makers):
        if family in args.only:
            more, built = make(plans)
            cases.update(more)
            trainers += built
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, setup in cases.items():
            times[name].append(seconds_per_iteration(setup(), args.iterations))
    reference = statistics.median(times["LabeledOnly (nnU-Net step)"])
    print(f"command: python {' '.join(sys.argv)}")
    from nnunet_contrast.commands.benchmark.records import cpu_description, source_commit
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, {cpu_description(torch)}, "
          f"torch {torch.__version__}, CPU; commit: {source_commit() or 'not a git checkout'}; "
          f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"batch {args.batch} labelled patches; SupConLocal global adds {baseline.unlabeled_batch_size} "
          f"unlabelled images and its local stage uses {supcon['local_images']} labelled images x 2 views; "
          f"PseudoLabelContrast joint adds {baseline.unlabeled_batch_size} unlabelled images; GlobalLocalContrast "
          f"pretraining batches are {args.batch} images (G^D/L^D: {args.batch // 4} volumes x 4 partitions) x 2 "
          f"views; CrossLevel, IDEAL and self-training add {baseline.unlabeled_batch_size} unlabelled images to each "
          f"step (self-training: the teacher labels them, the student trains on both); median of "
          f"{args.rounds} rounds x {args.iterations} iterations")
    print("| stage | s / iteration | x LabeledOnly |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / reference:.2f} |")
    for trainer in trainers:
        shut_down(trainer)


if __name__ == "__main__":
    main()
