"""Seconds per training iteration of each stage of nnUNetTrainerSupConLocal against
nnUNetTrainerLabeledOnly at the same batch size, measured side by side in one process.

Both trainers are built on the same prepared dataset (embedded sample by default), with nnU-Net's
background data augmentation; an iteration is ``train_step(next(dataloader_train))`` exactly as in
nnU-Net's loop. Rounds alternate between the cases so that machine load hits all of them alike.

    python benchmarks/stage_timing.py [--batch 32] [--iterations 10] [--rounds 3] [--workdir DIR]
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="prepared dataset folder (reused if present)")
    args = parser.parse_args()
    from nnunet_contrast.demo import prepare_dataset
    from nnunet_contrast.losses import SupConLocalLoss
    from nnunet_contrast.settings import preset_settings

    root = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet_contrast_bench_"))
    plans = f"nnUNetPlans_bench{args.batch}"
    # the method's own defaults (not the CPU preset's) for what a step processes; only the batch is set
    defaults = preset_settings(["base", "supconlocal_hu2021"])
    sets = [f"batch_size={args.batch}",
            f"nnunet_contrast.semisup.unlabeled_batch_ratio={defaults['semisup']['unlabeled_batch_ratio']}",
            f"nnunet_contrast.supconlocal.local_images={defaults['supconlocal']['local_images']}"]
    env = prepare_dataset(root, "0.25", sets, plans=plans)
    os.environ.update(env)
    torch.set_num_threads(os.cpu_count())
    baseline = build("nnUNetTrainerLabeledOnly", plans)
    method = build("nnUNetTrainerSupConLocal", plans)
    s = method.method_settings
    stage_start = {"global": 0, "local": s["global_epochs"], "finetune": s["global_epochs"] + s["local_epochs"]}

    def stage(name, mode=None):
        def setup():
            method.current_epoch = stage_start[name]
            method.enter_stage(name)
            if mode:
                method.local_loss = SupConLocalLoss(s["local_temperature"], mode, s["stride"], s["block_size"],
                                                    s["local_form"], chunk_size=s["chunk_size"])
            return method
        return setup

    cases = {"LabeledOnly (nnU-Net step)": lambda: baseline,
             "SupConLocal global": stage("global"),
             "SupConLocal local, block 16": stage("local", "block"),
             "SupConLocal local, stride 4": stage("local", "stride"),
             "SupConLocal local, exact": stage("local", "exact"),
             "SupConLocal finetune": stage("finetune")}
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, setup in cases.items():
            times[name].append(seconds_per_iteration(setup(), args.iterations))
    reference = statistics.median(times["LabeledOnly (nnU-Net step)"])
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"CPU; date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"batch {args.batch} labelled patches (+{method.unlabeled_batch_size} unlabelled in the global stage), "
          f"local stage on {s['local_images'] or args.batch} labelled images x 2 views; "
          f"median of {args.rounds} rounds x {args.iterations} iterations")
    print("| stage | s / iteration | x LabeledOnly |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / reference:.2f} |")
    for trainer in (baseline, method):
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            getattr(loader, "_finish", lambda: None)()
        if getattr(trainer, "dataloader_unlabeled", None) is not None:
            trainer.dataloader_unlabeled.finish()


if __name__ == "__main__":
    main()
