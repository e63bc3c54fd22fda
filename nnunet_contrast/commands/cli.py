"""The ``nnunet-contrast`` command: split, add-unlabeled, plans, demo, benchmark, report, embed."""
import argparse
import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

from nnunet_contrast.errors import UserInputError


def cmd_split(args) -> None:
    from nnunet_contrast.nnunet_env import dataset_name, load_plans, nnunet_splits, preprocessed_base, \
        write_json_atomic
    from nnunet_contrast.data.split import make_split, parse_labeled, read_split

    labeled = parse_labeled(args.labeled)
    name = dataset_name(args.dataset)
    plans = load_plans(name, args.plans)
    folds, splits_path = nnunet_splits(name, plans)
    split = make_split(folds, labeled, args.seed)
    path = preprocessed_base(name) / args.name
    if path.is_file() and not args.force and read_split(path) != split:
        raise UserInputError(f"{path} exists with a different split: pass --force to replace it, or --name "
                             f"another file (runs already trained on the old split would no longer match)")
    write_json_atomic(path, split)
    counts = ", ".join(f"fold {i}: {len(f['labeled'])}/{len(f['labeled']) + len(f['unlabeled'])}"
                       for i, f in enumerate(split["folds"]))
    print(f"wrote {path} (labelled/training cases per fold, validation as in {splits_path.name}): {counts}")


def cmd_add_unlabeled(args) -> None:
    from nnunet_contrast.nnunet_env import dataset_name
    from nnunet_contrast.data.unlabeled import add_unlabeled_images

    name = dataset_name(args.dataset)
    for configuration in args.configurations:
        cases = add_unlabeled_images(name, Path(args.input), args.plans, configuration)
        print(f"added {len(cases)} unlabelled case(s) to {name} ({configuration}): {', '.join(cases)}")


def cmd_plans(args) -> None:
    from nnunet_contrast.nnunet_env import dataset_name
    from nnunet_contrast.commands.plans import write_plans

    path = write_plans(dataset_name(args.dataset), args.preset or [], args.set or [], args.output, args.plans,
                       args.configuration, force=args.force)
    print(f"wrote {path}; train with: nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr TRAINER "
          f"-p {args.output}")


def project_trainers() -> List[str]:
    return sorted(project_trainer_classes())


def project_trainer_classes() -> dict:
    """Name -> class of the nnU-Net trainers that our trainers/ folder defines (variants included), found
    by importing its modules, as nnU-Net's ``recursive_find_python_class`` finds a trainer there."""
    import importlib.util
    import inspect

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_contrast.resources import bundled_dir

    classes = {}
    for path in sorted(bundled_dir("trainers").glob("nnUNetTrainer*.py")):
        spec = importlib.util.spec_from_file_location(f"nnunet_contrast_trainers_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes.update({name: value for name, value in vars(module).items() if inspect.isclass(value) and
                        issubclass(value, nnUNetTrainer) and value.__module__ == module.__name__})
    return classes


def check_trainers(names: List[str], option: str, pairs: bool = False) -> None:
    """Every name a trainer of this project; with ``pairs`` also TARGET@SOURCE (the benchmark's rows of a trainer
    started from another's pretraining): two different trainers, both of nnU-Net's own network."""
    from nnunet_contrast.commands.benchmark.steps import FROM

    classes = project_trainer_classes()
    for name in names:
        sides = name.split(FROM) if pairs else [name]
        unknown = [side for side in sides if side not in classes]
        if unknown:
            raise UserInputError(f"{option} {name}: {unknown[0] or 'an empty name'} is not a trainer of this project; "
                                 f"choose from {sorted(classes)}")
        if len(sides) > 2 or (len(sides) == 2 and sides[0] == sides[1]):
            raise UserInputError(f"{option} {name}: a row from a pretraining is TARGET{FROM}SOURCE, two different "
                                 f"trainers, e.g. nnUNetTrainerPseudoLabelContrast{FROM}nnUNetTrainerGlobalLocalContrast")
        if len(sides) == 2:
            check_plain_network(classes, sides, f"{option} {name}")


def check_plain_network(classes: dict, names, where: str) -> None:
    """nnU-Net's -pretrained_weights moves weights between networks that nnU-Net's trainer builds; a trainer
    that builds its own (IDEAL's second decoder) can give or take none."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    own = [n for n in names if classes[n].build_network_architecture is not nnUNetTrainer.build_network_architecture]
    if own:
        raise UserInputError(f"{where}: {own[0]} builds a network of its own (nnU-Net's plus a second decoder), "
                             f"which -pretrained_weights cannot move weights to or from: name another trainer")


def check_assignments(texts: Optional[List[str]]) -> None:
    from nnunet_contrast.commands.plans import parse_assignment

    for text in texts or []:
        parse_assignment(text)


def cmd_demo(args) -> None:
    import subprocess

    from nnunet_contrast.commands.demo import run_demo
    from nnunet_contrast.data.split import parse_labeled

    check_trainers([args.trainer], "--trainer")
    parse_labeled(args.labeled)
    check_assignments(args.set)
    try:
        run_demo(args.trainer, Path(args.workdir) if args.workdir else None, args.labeled, args.set or [], args.seed)
    except subprocess.CalledProcessError as err:
        raise UserInputError(f"step '{' '.join(map(str, err.cmd[:2]))}' failed with exit code {err.returncode}; "
                             f"its output is above") from None


def cmd_benchmark(args) -> None:
    from nnunet_contrast.commands.benchmark.report import write_report
    from nnunet_contrast.commands.benchmark import runs
    from nnunet_contrast.settings import all_preset_names

    trainers = args.trainers or project_trainers()
    check_trainers(trainers, "--trainers", pairs=True)
    if args.budget not in all_preset_names():
        raise UserInputError(f"--budget {args.budget} is not a preset of plans/: choose one of {all_preset_names()}")
    check_assignments(args.set)
    if args.msd and not Path(args.msd).is_dir():
        raise UserInputError(f"--msd {args.msd} is not a folder: pass an MSD task folder, e.g. Task04_Hippocampus")
    budget = runs.Budget(args.budget, tuple(args.set or []), args.configuration, args.plans)
    benchmark = runs.Benchmark(Path(args.workdir), Path(args.msd) if args.msd else None, trainers, args.fractions,
                               args.folds, budget, args.seed, args.device,
                               upper_bound=not args.no_upper_bound, train_seed=args.train_seed,
                               existing_dataset=args.dataset, with_recipe=args.recipe)
    if args.dry_run:
        todo = runs.execute(benchmark.steps(), {}, dry_run=True)
        print(f"{todo} step(s) to do; {len(benchmark.runs())} run(s) in this benchmark")
        return
    with benchmark.lock() as lock:
        runner = functools.partial(runs.subprocess_runner, keep_fds=(lock,))
        runs.execute(benchmark.steps(), benchmark.environment(), runner=runner)
    if (benchmark.workdir / "results").is_dir():
        print(f"report: {write_report(benchmark.workdir)}")


def cmd_report(args) -> None:
    from nnunet_contrast.commands.benchmark.records import write_csv
    from nnunet_contrast.commands.benchmark.report import write_report

    workdir = Path(args.workdir)
    path = write_report(workdir, args.also or ())
    own = f" and {write_csv(workdir)}" if (workdir / "results").is_dir() else ""
    print(f"wrote {path}{own}")


def cmd_embed(args) -> None:
    from nnunet_contrast.commands.embed import embed
    from nnunet_contrast.nnunet_env import dataset_name, require_path_variables

    require_path_variables("nnUNet_results")
    model = Path(os.environ["nnUNet_results"]) / dataset_name(args.dataset) / f"{args.tr}__{args.p}__{args.c}"
    if not model.is_dir():
        raise UserInputError(f"no trained model in {model}: check -d, -tr, -p and -c (as for nnUNetv2_predict)")
    score = embed(model, args.f, args.chk, Path(args.i), Path(args.l), Path(args.o), args.stage, args.pixels,
                  args.device)
    print(f"wrote {args.o}; silhouette of the classes (cosine, normalised features): {score:.3f}")


def build_parser() -> argparse.ArgumentParser:
    from nnunet_contrast.commands.benchmark.runs import (BASELINE, DEFAULT_BUDGET, DEFAULT_CONFIGURATION, DEFAULT_FRACTIONS,
                                                         DEFAULT_PLANS, PLANNERS)
    from nnunet_contrast.settings import all_preset_names

    parser = argparse.ArgumentParser(prog="nnunet-contrast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="choose which training cases of every fold keep their labels")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 4")
    p.add_argument("--labeled", required=True,
                   help="fraction of each fold's training cases (with a decimal point, e.g. 0.05) or a count (e.g. 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--name", default="splits_semisup.json",
                   help="file name in the dataset's preprocessed folder (default splits_semisup.json)")
    p.add_argument("--force", action="store_true", help="replace an existing, different split file")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("add-unlabeled", help="preprocess a folder of unlabelled images into the unlabelled pool")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-i", "--input", required=True, help="folder of CASE_XXXX<file_ending> images, as nnU-Net names them")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-c", "--configurations", nargs="+", default=[DEFAULT_CONFIGURATION], metavar="CONFIGURATION",
                   help="configurations to preprocess them for, as for nnUNetv2_preprocess (default 2d; e.g. 2d "
                        "3d_fullres)")
    p.set_defaults(func=cmd_add_unlabeled)

    p = sub.add_parser("plans", help="write a copy of the plans with presets and settings merged in")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("--preset", action="append", choices=all_preset_names(),
                   help="preset from plans/ to merge (repeatable, applied in order)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="setting inside the configuration, e.g. nnunet_contrast.supconlocal.stride=2 or batch_size=16")
    p.add_argument("-o", "--output", required=True, help="new plans identifier, e.g. nnUNetPlans_cpu")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="source plans identifier, e.g. nnUNetResEncUNetMPlans "
                                                                "(default nnUNetPlans)")
    p.add_argument("-c", "--configuration", default=DEFAULT_CONFIGURATION,
                   help="configuration the presets and --set go into, as nnU-Net names it (default 2d; e.g. "
                        "3d_fullres); the others are copied as they are")
    p.add_argument("--force", action="store_true", help="replace an existing, different plans file of that name")
    p.set_defaults(func=cmd_plans)

    p = sub.add_parser("demo", help="convert, plan, split, train briefly on the CPU, predict held-out scans, print Dice")
    p.add_argument("--trainer", default="nnUNetTrainerSupConLocal")
    p.add_argument("--labeled", default="0.25", help="labelled fraction or count of each fold (default 0.25)")
    p.add_argument("--workdir", help="keep everything in this folder (default: a temporary folder, removed after)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra plans settings, as for 'plans'")
    p.add_argument("--seed", type=int, default=0, help="training seed (nnunet_contrast.run.seed; -1: unseeded, "
                                                       "as nnU-Net; default 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("benchmark", help="train and score every trainer at several labelled fractions and folds "
                                         "with one budget, through nnU-Net's commands (resumable)")
    p.add_argument("--workdir", required=True, help="folder for nnU-Net's data, the runs and the results")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--msd", help="MSD task folder, e.g. Task04_Hippocampus (read only); converted, planned and "
                                      "trained in --workdir")
    source.add_argument("--dataset", help="ID or name of a dataset nnU-Net has converted and planned (2d), in your "
                                          "nnUNet_raw/_preprocessed/_results, where it trains")
    p.add_argument("--fractions", nargs="+", default=list(DEFAULT_FRACTIONS),
                   help="labelled fractions (0.05) or counts (10) of each fold's training cases "
                        f"(default {' '.join(DEFAULT_FRACTIONS)})")
    p.add_argument("--folds", nargs="+", type=int, default=[0], help="nnU-Net folds (default 0)")
    p.add_argument("--trainers", nargs="+", help="default: every trainer of this project; TARGET@SOURCE: TARGET "
                                                 "trained from SOURCE's checkpoint_pretrained.pth (-pretrained_weights)")
    p.add_argument("--budget", default=DEFAULT_BUDGET, help=f"preset of plans/ (default {DEFAULT_BUDGET})")
    p.add_argument("-c", "--configuration", default=DEFAULT_CONFIGURATION,
                   help=f"nnU-Net's configuration the runs train (default {DEFAULT_CONFIGURATION}; e.g. 3d_fullres)")
    p.add_argument("-p", "--plans", default=DEFAULT_PLANS,
                   help=f"nnU-Net's plans identifier the runs start from (default {DEFAULT_PLANS}; e.g. "
                        f"nnUNetResEncUNetMPlans; with --msd one of {', '.join(PLANNERS)}, planned here)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="budget settings after the preset")
    p.add_argument("--seed", type=int, default=0, help="seed of the labelled/unlabelled split (default 0)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="training seed of every run (nnunet_contrast.run.seed; default 0; -1: unseeded, as nnU-Net)")
    p.add_argument("--device", default="cpu", help="nnUNetv2_train -device (default cpu)")
    p.add_argument("--no-upper-bound", action="store_true",
                   help=f"skip {BASELINE} on all labels of each fold (the upper bound)")
    p.add_argument("--recipe", action="store_true",
                   help=f"add nnU-Net's maintainers' recipe as a row: {BASELINE}, nnUNetv2_predict on the unlabelled "
                        "cases, then training again on the labels plus those predictions (MIC-DKFZ/nnUNet#2338)")
    p.add_argument("--dry-run", action="store_true", help="list the commands it would run, run nothing")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("embed", help="t-SNE picture of a trained model's pixel embeddings of labelled held-out "
                                     "images, coloured by class")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-tr", default="nnUNetTrainerSupConLocal", help="trainer (default nnUNetTrainerSupConLocal)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-c", default="2d", help="configuration (default 2d)")
    p.add_argument("-f", default="0", help="fold (default 0)")
    p.add_argument("--chk", default="checkpoint_final.pth", help="checkpoint (default checkpoint_final.pth)")
    p.add_argument("-i", required=True, help="folder of images named as nnU-Net names them (CASE_0000.nii.gz)")
    p.add_argument("-l", required=True, help="folder of their labels (CASE.nii.gz)")
    p.add_argument("-o", required=True, help="output PNG")
    p.add_argument("--stage", type=int, default=-1, help="decoder stage (default -1: the last, full resolution)")
    p.add_argument("--pixels", type=int, default=300, help="pixels per class (default 300)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("report", help="tables, plots and training curves of a benchmark from its result files")
    p.add_argument("--workdir", required=True, help="the benchmark's work folder (the report goes to its report/)")
    p.add_argument("--also", nargs="+", metavar="WORKDIR",
                   help="work folders of the same benchmark on other processor kinds, reported beside this one's "
                        "runs (paired only within a kind: a seeded run repeats on one kind, not across kinds)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserInputError as err:
        print(f"nnunet-contrast {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
