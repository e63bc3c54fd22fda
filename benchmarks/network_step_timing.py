"""Seconds per training step of the network nnU-Net builds for a configuration of a plans file, at chosen
batch sizes: forward, nnU-Net's Dice + CE on the full-resolution output, backward and an SGD step, on random
tensors (no data loading, no augmentation). It sized benchmark_cpu's 3d_fullres batch (plans/benchmark_cpu.json):

    python benchmarks/network_step_timing.py PLANS.json --configuration 3d_fullres --batches 9 2 4

prints the median of ``--steps`` steps per batch size, with the processor and thread count.
"""
import argparse
import json
import statistics
import time

import torch

from nnunet_contrast.commands.benchmark.records import cpu_description


def network(plans: dict, configuration: str, deep_supervision: bool = True):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch = plans["configurations"][configuration]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                  deep_supervision=deep_supervision)


def step_seconds(net, patch, batch: int, steps: int) -> float:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}, 1, 1,
                          dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    x, y = torch.randn(batch, 1, *patch), torch.randint(0, 3, (batch, 1, *patch))
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss(net(x)[0], y).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plans")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--batches", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    plans = json.load(open(args.plans))
    patch = plans["configurations"][args.configuration]["patch_size"]
    net = network(plans, args.configuration)
    print(f"{cpu_description(torch)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.configuration} patch {patch}")
    for batch in args.batches:
        print(f"batch {batch}: {step_seconds(net, patch, batch, args.steps):.2f} s/step (median of {args.steps})",
              flush=True)


if __name__ == "__main__":
    main()
