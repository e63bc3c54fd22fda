"""The recipe nnU-Net's maintainers give users with unlabelled data (MIC-DKFZ/nnUNet issue 2338), as a
benchmark row: what a user would do instead of installing us.

For each labelled fraction and fold, after the cell's ``nnUNetTrainerLabeledOnly`` run:
1. ``nnUNetv2_predict`` with that model on the fold's unlabelled training cases (and, for an MSD task,
   its unlabelled ``imagesTs`` scans; with ``--dataset``, images added with ``nnunet-contrast add-unlabeled``
   are left out: their raw files are not kept);
2. a new nnU-Net dataset (in ``WORKDIR/recipe``, nnU-Net folders of its own): the fold's labelled cases
   with their labels, the unlabelled ones with the predictions as labels, and the fold's validation
   cases with their labels; its fold 0 trains on the first two and validates on the third;
3. ``nnUNetv2_preprocess`` with the benchmark's plans (same configuration, batch and budget), and
   ``nnUNetv2_train ... -tr nnUNetTrainerLabeledOnly`` on every training case (no split file: all count as
   labelled), scored by nnU-Net's validation of the same validation cases as every other run.
"""
import functools
import json
import shutil
from pathlib import Path
from typing import Dict, List

from nnunet_contrast.commands.benchmark.steps import BASELINE, RECIPE, Run, Step
from nnunet_contrast.errors import UserInputError

FIRST_DATASET_ID = 901


class MaintainersRecipe:
    """The steps and folders of the recipe for one benchmark (``runs.Benchmark``)."""

    def __init__(self, benchmark):
        self.benchmark = benchmark
        self.root = benchmark.workdir / "recipe"
        self.proposed: Dict[str, int] = {}  # ids of datasets not built yet, registered when built

    # -- where things are -------------------------------------------------------------------------
    def environment(self) -> dict:
        from nnunet_contrast.nnunet_env import nnunet_environment

        return nnunet_environment(self.root, create=False)  # build_dataset creates what nnU-Net reads

    def folder(self, run) -> Path:
        return self.root / "work" / self.benchmark.plans(run) / f"fold{run.fold}"

    def registry(self) -> Dict[str, int]:
        path = self.root / "datasets.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def dataset_id(self, run) -> int:
        """A dataset id per plans and fold, kept in ``recipe/datasets.json`` once its dataset is built
        (new ones from 901 up)."""
        key, registry = self.key(run), self.registry()
        if key in registry:
            return registry[key]
        if key not in self.proposed:
            self.proposed[key] = max([*registry.values(), *self.proposed.values()], default=FIRST_DATASET_ID - 1) + 1
        return self.proposed[key]

    def register(self, run) -> None:
        from nnunet_contrast.nnunet_env import write_json_atomic

        write_json_atomic(self.root / "datasets.json", {**self.registry(), self.key(run): self.dataset_id(run)})

    def key(self, run) -> str:
        return f"{self.benchmark.plans(run)}/fold{run.fold}"

    def dataset_name(self, run) -> str:
        return f"Dataset{self.dataset_id(run):03d}_{self.benchmark.dataset.split('_', 1)[1]}Recipe"

    def fold_folder(self, run) -> Path:
        return (self.root / "nnUNet_results" / self.dataset_name(run) / f"{BASELINE}__{self.benchmark.plans(run)}__{self.benchmark.configuration}"
                / "fold_0")

    # -- what to do -------------------------------------------------------------------------------
    def steps(self, run) -> list:
        b, work, plans = self.benchmark, self.folder(run), self.benchmark.plans(run)
        model = b.fold_folder(Run(BASELINE, run.fraction, run.fold))
        new_id = str(self.dataset_id(run))
        env_of_recipe = self.environment()
        return [
            Step(f"recipe {run.fraction} fold {run.fold}: unlabelled images", work / "images.done",
                 action=lambda: self.collect_images(run)),
            Step(f"recipe {run.fraction} fold {run.fold}: predict them", work / "predicted.done",
                 ["nnUNetv2_predict", "-i", str(work / "images"), "-o", str(work / "predictions"), "-d",
                  b.dataset_id, "-c", b.configuration, "-tr", BASELINE, "-p", plans, "-f", str(run.fold), "-device",
                  b.device, "-npp", "1", "-nps", "1"], stamp=True, log=work / "predict.log",
                 before=lambda: self.require(model / "checkpoint_final.pth")),
            Step(f"recipe {run.fraction} fold {run.fold}: dataset {self.dataset_name(run)}",
                 self.root / "nnUNet_preprocessed" / self.dataset_name(run) / f"{plans}.json",
                 action=lambda: self.build_dataset(run)),
            Step(f"recipe {run.fraction} fold {run.fold}: preprocess", work / "preprocessed.done",
                 ["nnUNetv2_preprocess", "-d", new_id, "-plans_name", plans, "-c", b.configuration, "-np", "2"], stamp=True,
                 log=work / "preprocess.log", env=env_of_recipe),
            Step(f"train {RECIPE} {run.fraction} fold {run.fold}", self.fold_folder(run) / "validation" /
                 "summary.json",
                 ["nnUNetv2_train", new_id, b.configuration, "0", "-tr", BASELINE, "-p", plans, "-device", b.device],
                 resume_if=(self.fold_folder(run) / "checkpoint_latest.pth",
                            self.fold_folder(run) / "checkpoint_final.pth"),
                 log=b.run_file("logs", run, "log"), env=env_of_recipe),
        ]

    @staticmethod
    def require(path: Path) -> None:
        if not path.is_file():
            raise UserInputError(f"{path} is missing: the recipe predicts with the cell's "
                                 f"nnUNetTrainerLabeledOnly run, which must finish first")

    # -- the data ---------------------------------------------------------------------------------
    def fold_cases(self, run) -> Dict[str, List[str]]:
        """The fold's labelled, unlabelled and validation cases (the benchmark's split, nnU-Net's folds)."""
        b = self.benchmark
        split = json.loads((b.preprocessed / b.split_name(run.fraction)).read_text())["folds"][run.fold]
        validation = json.loads((b.preprocessed / "splits_final.json").read_text())[run.fold]["val"]
        return {"labeled": split["labeled"], "unlabeled": split["unlabeled"], "validation": validation}

    def raw(self) -> Path:
        return self.benchmark.nnunet_folder("nnUNet_raw") / self.benchmark.dataset

    @functools.cached_property
    def ending(self) -> str:
        """The dataset's file ending (dataset.json read once, not once per case)."""
        return json.loads((self.raw() / "dataset.json").read_text())["file_ending"]

    def images_of(self, case: str) -> List[Path]:
        images = sorted((self.raw() / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{self.ending}"))
        if not images:
            raise UserInputError(f"no image of case {case} in {self.raw() / 'imagesTr'}: the benchmark's dataset "
                                 f"must keep nnU-Net's raw images")
        return images

    def collect_images(self, run) -> None:
        """The images to predict: the fold's unlabelled cases and the task's unlabelled scans."""
        images = self.folder(run) / "images"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True)
        for case in self.fold_cases(run)["unlabeled"]:
            for image in self.images_of(case):
                shutil.copy(image, images / image.name)
        added = self.benchmark.workdir / "unlabeled"
        for image in sorted(added.glob(f"*{self.ending}")) if self.benchmark.msd is not None else []:
            shutil.copy(image, images / image.name)
        (self.folder(run) / "images.done").touch()

    def build_dataset(self, run) -> None:
        """Raw dataset, plans and fold-0 split of the second training (written before its plans file,
        which marks it done)."""
        from nnunet_contrast.nnunet_env import write_json_atomic

        b, name, cases, ending = self.benchmark, self.dataset_name(run), self.fold_cases(run), self.ending
        self.register(run)
        raw = self.root / "nnUNet_raw" / name
        shutil.rmtree(raw, ignore_errors=True)
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir()
        predictions = sorted((self.folder(run) / "predictions").glob(f"*{ending}"))
        predicted = [p.name[:-len(ending)] for p in predictions]
        for case in cases["labeled"] + cases["validation"]:
            shutil.copy(self.raw() / "labelsTr" / f"{case}{ending}", raw / "labelsTr" / f"{case}{ending}")
        for prediction, case in zip(predictions, predicted):
            shutil.copy(prediction, raw / "labelsTr" / f"{case}{ending}")
        predicted_images = self.folder(run) / "images"
        for case in cases["labeled"] + cases["validation"] + predicted:
            sources = self.images_of(case) if case not in predicted else \
                sorted(predicted_images.glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
            for image in sources:
                shutil.copy(image, raw / "imagesTr" / image.name)
        dataset = json.loads((self.raw() / "dataset.json").read_text())
        dataset.pop("dataset", None)  # explicit file lists would point at the original's labels
        dataset["numTraining"] = len(list((raw / "labelsTr").iterdir()))
        preprocessed = self.root / "nnUNet_preprocessed" / name
        preprocessed.mkdir(parents=True, exist_ok=True)
        for folder in (raw, preprocessed):  # nnUNetv2_preprocess reads the preprocessed folder's copy
            write_json_atomic(folder / "dataset.json", dataset)
        shutil.copy(b.preprocessed / "dataset_fingerprint.json", preprocessed / "dataset_fingerprint.json")
        write_json_atomic(preprocessed / "splits_final.json",
                          [{"train": sorted(cases["labeled"] + predicted), "val": sorted(cases["validation"])}])
        plans = json.loads((b.preprocessed / f"{b.plans(run)}.json").read_text())
        plans["dataset_name"] = name
        write_json_atomic(preprocessed / f"{b.plans(run)}.json", plans)
