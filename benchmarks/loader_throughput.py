"""CPU seconds that the batches of one training step cost: nnU-Net's labelled batch (loading, cropping and
nnU-Net's augmentation) and, for a trainer that reads unlabelled batches, our unlabelled one (the same loader and
augmentation, images only). Measured in one process and one thread (``nnUNet_n_proc_DA=0``: nnU-Net's
single-threaded augmenter) as process time, so that the number does not depend on what else the machine runs.

A GPU taking S seconds per step is fed only if each loader's worker processes make its batch in S. Each loader
starts ``nnUNet_n_proc_DA`` workers (nnU-Net's training loader, and our unlabelled one beside it), so the script
prints, for each step time given with ``--gpu-step``, the ``nnUNet_n_proc_DA`` to set (the slowest loader's
seconds / S) and the cores those workers need (the sum over loaders), on cores as fast as this one. Not counted:
nnU-Net's validation loader (half as many workers, idle once its queue is full), passing batches between
processes, and the loaders a method's pretraining stages build for themselves (only the batches of the step
``get_dataloaders`` prepares: nnU-Net's, and the unlabelled one where the trainer reads it):

    python benchmarks/loader_throughput.py -d 4 -c 2d -p nnUNetPlans -tr nnUNetTrainerLabeledOnly \
        nnUNetTrainerSelfTraining --batches 20 --gpu-step 0.05 0.1

It reads the preprocessed dataset under ``nnUNet_preprocessed`` (and the semi-supervised split the trainers
read); the trainers' output goes to a temporary folder, not to ``nnUNet_results``.
"""
import argparse
import math
import os
import tempfile
import time

os.environ["nnUNet_n_proc_DA"] = "0"  # before nnU-Net reads it: batches made in this process
os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="loader_throughput_")  # before nnunetv2.paths is imported

import torch  # noqa: E402

from nnunet_contrast.commands.benchmark.records import cpu_description  # noqa: E402


def batch_seconds(loader, batches: int) -> float:
    """Process seconds per batch, after one batch to warm the loader up."""
    next(loader)
    start = time.process_time()
    for _ in range(batches):
        next(loader)
    return (time.process_time() - start) / batches


def workers_and_cores(loader_seconds, gpu_step: float) -> str:
    """``nnUNet_n_proc_DA`` (each loader starts that many workers: the slowest sets it) / the cores they need."""
    return f"{math.ceil(max(loader_seconds) / gpu_step)} / {sum(math.ceil(v / gpu_step) for v in loader_seconds)}"


def step_loaders(dataset: str, configuration: str, plans: str, trainer_name: str, fold: int) -> dict:
    """name -> (loader, batch size) of every batch one training step of the trainer draws."""
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, plans, False, torch.device("cpu"))
    trainer.initialize()
    train, _ = trainer.get_dataloaders()
    loaders = {"labelled": (train, trainer.batch_size)}
    unlabeled = getattr(trainer, "dataloader_unlabeled", None)
    if unlabeled is not None:
        loaders["unlabelled"] = (unlabeled, trainer.unlabeled_batch_size)
    return loaders


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-tr", "--trainers", nargs="+",
                        default=["nnUNetTrainerLabeledOnly", "nnUNetTrainerSelfTraining"])
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per loader (default 20)")
    parser.add_argument("--gpu-step", type=float, nargs="*", default=[0.05, 0.1, 0.2],
                        help="GPU seconds per step to size the loader processes for (default 0.05 0.1 0.2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{cpu_description(torch)}, 1 thread, torch {torch.__version__}; {args.configuration} of {args.plans}, "
          f"{args.batches} batches per loader")
    header = " | ".join(f"nnUNet_n_proc_DA / cores at {s} s/step" for s in args.gpu_step)
    print(f"| trainer | batch | CPU s per batch | CPU s per step | {header} |")
    print("|---|---|---|---|" + "---|" * len(args.gpu_step))
    for name in args.trainers:
        loaders = step_loaders(args.dataset, args.configuration, args.plans, name, args.fold)
        seconds = {kind: batch_seconds(loader, args.batches) for kind, (loader, _) in loaders.items()}
        step = sum(seconds.values())
        batches = " + ".join(f"{kind} {size}" for kind, (_, size) in loaders.items())
        per_batch = " + ".join(f"{seconds[kind]:.3f}" for kind in loaders)
        needed = " | ".join(workers_and_cores(seconds.values(), s) for s in args.gpu_step)
        print(f"| {name} | {batches} | {per_batch} | {step:.3f} | {needed} |", flush=True)


if __name__ == "__main__":
    main()
