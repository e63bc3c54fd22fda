"""Every trainer on a GPU as nnU-Net trains there: CUDA, nnU-Net's autocast and GradScaler, and the network
compiled by nnU-Net (``nnUNet_compile``, on by default on CUDA), in 2d and 3d_fullres, a few iterations of each
stage; then ``nnUNetv2_predict`` with each model, and with two or more GPUs ``nnUNetv2_train -num_gpus 2``.

Per trainer and configuration it prints seconds per training iteration (after the first epoch, which compiles),
peak GPU memory, and how long the steps waited for their batches (nnU-Net's loader and our unlabelled loader),
each beside nnUNetTrainerLabeledOnly's. A trainer without a 3D form shows its one-line refusal.

    python benchmarks/gpu_check.py --workdir DIR [--msd Task04_Hippocampus] [--iterations 20]
        [--configurations 2d 3d_fullres] [--trainers ...] [-p nnUNetResEncUNetMPlans] [--device cuda]
        [--out gpu_check.json]

Without ``--msd`` it runs on the embedded sample; ``-p`` starts from nnU-Net's residual-encoder plans (planned
here with their planner) instead of the default ones. Each pretraining stage runs one epoch of ``--iterations``
(the papers' presets pretrain for 40 to 70 epochs). ``--device cpu`` runs the same checks on the CPU (no
autocast, no compile: nnU-Net turns both off there), which is how tests/test_gpu_check.py tests this script.
Each trainer and configuration is one nnU-Net run of its own, with nnU-Net's validation at its end and a
prediction: on a short GPU lease, name a few ``--trainers`` per call.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nnunet_contrast.commands.plans import set_options
from nnunet_contrast.nnunet_env import command_path

CONFIGURATIONS = ("2d", "3d_fullres")
# the source plans (nnU-Net's -p) and the planner that writes them; ours add "_gpucheck_CONFIGURATION"
PLANNERS = {"nnUNetPlans": None, "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
            "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL"}
BASELINE = "nnUNetTrainerLabeledOnly"


def budget(iterations: int) -> list:
    """Four epochs of ``iterations`` (two of each stage where a method has two), and one epoch as long of each
    pretraining stage (the papers' presets pretrain for 40 to 70 epochs)."""
    pretraining = [f"nnunet_contrast.{section}.{epochs}=1" for section, epochs in
                   (("supconlocal", "global_epochs"), ("supconlocal", "local_epochs"), ("globallocal", "global_epochs"),
                    ("globallocal", "local_epochs"), ("ideal", "pretrain_epochs"))]
    lengths = [f"nnunet_contrast.{section}.pretrain_iterations_per_epoch={iterations}"
               for section in ("supconlocal", "globallocal", "ideal")]
    return ["nnunet_contrast.budget.num_epochs=4", f"nnunet_contrast.budget.num_iterations_per_epoch={iterations}",
            "nnunet_contrast.budget.num_val_iterations_per_epoch=2", "nnunet_contrast.budget.save_every=4",
            "nnunet_contrast.selftraining.warmup_fraction=0.5", "nnunet_contrast.pseudolabel.warmup_fraction=0.5",
            "nnunet_contrast.run.seed=0", *pretraining, *lengths]


def plans_name(source: str, configuration: str) -> str:
    return f"{source}_gpucheck_{configuration}"


def prepare(workdir: Path, msd, configurations, iterations: int, source: str) -> dict:
    from nnunet_contrast.commands.demo import prepare_dataset, run

    env = prepare_dataset(workdir, "0.25", [], "nnUNetPlans_demo", msd_source=Path(msd) if msd else None)
    env["nnUNet_compile"] = os.environ.get("nnUNet_compile", "true")  # nnU-Net's default on CUDA
    if PLANNERS[source]:
        run(["nnUNetv2_plan_experiment", "-d", "4", "-pl", PLANNERS[source]], env)
    for configuration in configurations:
        if configuration != "2d":
            run(["nnUNetv2_preprocess", "-d", "4", "-c", configuration, "-np", "2"], env)
            run(["nnunet-contrast", "add-unlabeled", "-d", "4", "-i", str(workdir / "unlabeled"), "-c", configuration],
                env)
        run(["nnunet-contrast", "plans", "-d", "4", "-p", source, "-c", configuration,
             *set_options(budget(iterations)), "-o", plans_name(source, configuration), "--force"], env)
    return env


def measure_one(trainer: str, configuration: str, plans: str, device: str) -> dict:
    """In this process: nnU-Net's run_training, with the time of each step and of the waits for batches."""
    import torch
    from nnunetv2.run.run_training import run_training
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_contrast.training.method import MethodTrainer
    from nnunet_contrast.training.semisup import SemiSupervisedTrainer

    steps, waits, marks = [], [], {"end": None}
    on_epoch_start, next_unlabeled = nnUNetTrainer.on_train_epoch_start, SemiSupervisedTrainer.next_unlabeled_images

    def timed_unlabeled(self):
        started = time.perf_counter()
        images = next_unlabeled(self)
        waits.append(time.perf_counter() - started)
        return images

    def epoch_start(self):
        marks["end"] = None  # the wait before an epoch's first step includes validation and logging
        steps.append(None)
        on_epoch_start(self)

    # MethodTrainer's train_step calls nnU-Net's for supervised stages: each is timed where it is the outermost
    for cls in {nnUNetTrainer, MethodTrainer, *all_trainer_classes()}:
        if "train_step" in vars(cls):
            original = vars(cls)["train_step"]
            setattr(cls, "train_step", outermost(original, steps, waits, marks))
    SemiSupervisedTrainer.next_unlabeled_images = timed_unlabeled
    nnUNetTrainer.on_train_epoch_start = epoch_start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_training("4", configuration, 0, trainer, plans, device=torch.device(device))
    epochs = split_epochs(steps)
    later = [s for epoch in epochs[1:] for s in epoch] or [s for epoch in epochs for s in epoch]
    return {"trainer": trainer, "configuration": configuration,
            "seconds_per_iteration": sum(later) / len(later),
            "data_wait_per_iteration": sum(waits) / max(1, sum(len(e) for e in epochs)),
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}


def outermost(original, steps, waits, marks):
    """``original`` train_step, timed where it is the outermost call of a step (a trainer's own train_step calls
    nnU-Net's for its supervised stages); the time since the previous step ended is the wait for the batch."""
    def step(self, batch):
        depth = getattr(self, "_gpu_check_depth", 0)
        if depth:
            return original(self, batch)
        started = time.perf_counter()
        if marks["end"] is not None:
            waits.append(started - marks["end"])
        self._gpu_check_depth = 1
        try:
            output = original(self, batch)
        finally:
            self._gpu_check_depth = 0
        marks["end"] = time.perf_counter()
        steps.append(marks["end"] - started)
        return output
    return step


def all_trainer_classes():
    from nnunet_contrast.training.semisup import SemiSupervisedTrainer

    found, todo = set(), [SemiSupervisedTrainer]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def split_epochs(steps):
    epochs = []
    for step in steps:
        if step is None:
            epochs.append([])
        elif epochs:
            epochs[-1].append(step)
    return [e for e in epochs if e]


def run_one(trainer: str, configuration: str, plans: str, env: dict, device: str, log: Path) -> dict:
    """A fresh process per run (its own CUDA context and peak memory); a refusal is its one error line."""
    command = [sys.executable, __file__, "--one", trainer, configuration, plans, "--device", device]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"trainer": trainer, "configuration": configuration, "error": last_line(result.stderr)}


def predict(trainer: str, configuration: str, plans: str, env: dict, device: str, workdir: Path,
            fold: int = 0) -> bool:
    out = workdir / "predictions" / f"{trainer}_{configuration}_fold{fold}"
    result = subprocess.run([command_path("nnUNetv2_predict"), "-i", str(workdir / "heldout"), "-o", str(out), "-d", "4", "-c",
                             configuration, "-tr", trainer, "-p", plans, "-f", str(fold),
                             "-device", device, "-chk", "checkpoint_final.pth"], env=env, capture_output=True, text=True)
    return result.returncode == 0 and any(out.glob("*.nii.gz"))


def two_gpus(trainer: str, configuration: str, plans: str, env: dict, workdir: Path) -> str:
    """Fold 1 with ``-num_gpus 2`` (nnU-Net's DDP), then nnUNetv2_predict with that model."""
    result = subprocess.run([command_path("nnUNetv2_train"), "4", configuration, "1", "-tr", trainer, "-p",
                             plans, "-num_gpus", "2"], env=env, capture_output=True, text=True)
    (workdir / f"{trainer}_{configuration}_2gpus.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        return "failed: " + last_line(result.stderr)
    return "trained, predicted" if predict(trainer, configuration, plans, env, "cuda", workdir, fold=1) else "trained, predict failed"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def table(results) -> str:
    baseline = {r["configuration"]: r for r in results if r["trainer"] == BASELINE and "error" not in r}
    lines = ["| configuration | trainer | s/iteration | x LabeledOnly | data wait s/it | peak GPU GiB | x LabeledOnly "
             "| predict | 2 GPUs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['configuration']} | {r['trainer']} | refused or failed: {r['error']} ||||||||")
            continue
        base = baseline.get(r["configuration"], r)
        memory, base_memory = r["peak_gpu_memory_gib"], base["peak_gpu_memory_gib"]
        lines.append(f"| {r['configuration']} | {r['trainer']} | {r['seconds_per_iteration']:.3f} | "
                     f"{r['seconds_per_iteration'] / base['seconds_per_iteration']:.2f} | "
                     f"{r['data_wait_per_iteration']:.3f} | {'-' if memory is None else f'{memory:.2f}'} | "
                     f"{'-' if memory is None else f'{memory / base_memory:.2f}'} | {r.get('predicted', '-')} | "
                     f"{r.get('two_gpus', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--msd", help="MSD Task04_Hippocampus folder (default: the embedded sample)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS))
    parser.add_argument("--trainers", nargs="+")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("-p", "--plans", default="nnUNetPlans", choices=list(PLANNERS),
                        help="nnU-Net's plans to start from (default nnUNetPlans; ResEnc: nnUNetResEncUNetMPlans)")
    parser.add_argument("--one", nargs=3, metavar=("TRAINER", "CONFIGURATION", "PLANS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one, args.device)))
        return 0
    from nnunet_contrast.commands.cli import project_trainers

    trainers = args.trainers or project_trainers()
    trainers = [BASELINE] + [t for t in trainers if t != BASELINE]
    workdir = args.workdir.resolve()
    env = prepare(workdir, args.msd, args.configurations, args.iterations, args.plans)
    import torch
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    results = []
    for configuration in args.configurations:
        plans = plans_name(args.plans, configuration)
        for trainer in trainers:
            result = run_one(trainer, configuration, plans, env, args.device, workdir / f"{trainer}_{configuration}.log")
            if "error" not in result:
                result["predicted"] = predict(trainer, configuration, plans, env, args.device, workdir)
                if gpus >= 2:
                    result["two_gpus"] = two_gpus(trainer, configuration, plans, env, workdir)
            results.append(result)
            print(json.dumps(result), flush=True)
    header = {"device": torch.cuda.get_device_name(0) if gpus else args.device, "gpus": gpus,
              "torch": torch.__version__, "nnUNet_compile": env["nnUNet_compile"], "iterations": args.iterations,
              "plans": args.plans,
              "date": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps({"machine": header, "results": results}, indent=2) + "\n")
    print(json.dumps(header))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
