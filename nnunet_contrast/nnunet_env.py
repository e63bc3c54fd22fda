"""nnU-Net's folders, datasets and plans, with one-line errors for what a user can fix."""
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple

from nnunet_contrast.errors import UserInputError

PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_path_variables(*names: str) -> None:
    """Fail when one of nnU-Net's path variables is unset (nnU-Net itself fails later and louder)."""
    missing = [n for n in (names or PATH_VARIABLES) if not os.environ.get(n)]
    if missing:
        raise UserInputError(f"nnU-Net path variable(s) {', '.join(missing)} not set: export them "
                             f"(e.g. export {missing[0]}=/data/{missing[0]}), see nnU-Net's "
                             f"documentation/setting_up_paths.md")


def dataset_name(dataset: str) -> str:
    """``4``, ``004`` or ``Dataset004_Hippocampus`` -> ``Dataset004_Hippocampus``."""
    require_path_variables("nnUNet_preprocessed")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset if str(dataset).startswith("Dataset") else int(dataset))
    except (RuntimeError, ValueError) as err:
        raise UserInputError(f"dataset {dataset!r} not found under nnUNet_raw/nnUNet_preprocessed: "
                             f"convert and plan it first (nnUNetv2_plan_and_preprocess -d ID -c 2d)") from err


def preprocessed_base(name: str) -> Path:
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    if not folder.is_dir():
        raise UserInputError(f"{folder} does not exist: run nnUNetv2_plan_and_preprocess -d {name} -c 2d first")
    return folder


def load_plans(name: str, plans_identifier: str = "nnUNetPlans", configuration: str = "2d") -> dict:
    """The plans file of a dataset, checked to hold ``configuration``."""
    path = preprocessed_base(name) / f"{plans_identifier}.json"
    if not path.is_file():
        raise UserInputError(f"plans file {path} not found: run nnUNetv2_plan_and_preprocess -d {name} -c {configuration} "
                             f"(or pass the right -p PLANS_IDENTIFIER)")
    plans = json.loads(path.read_text())
    if configuration not in plans.get("configurations", {}):
        raise UserInputError(f"the plans {path.name} of {name} have no '{configuration}' configuration: "
                             f"re-plan the dataset with nnUNetv2_plan_and_preprocess -d {name} -c {configuration}")
    return plans


def configuration_data_folder(name: str, plans: dict, configuration: str = "2d") -> Path:
    """The folder of preprocessed cases of ``configuration`` (checked to exist)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    folder = preprocessed_base(name) / identifier
    if not folder.is_dir():
        raise UserInputError(f"preprocessed '{configuration}' data of {name} not found ({folder}): run "
                             f"nnUNetv2_plan_and_preprocess -d {name} -c {configuration}")
    return folder


def dataset_json(name: str) -> dict:
    return json.loads((preprocessed_base(name) / "dataset.json").read_text())


def case_identifiers(folder: Path) -> list:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    return sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text so that readers see either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def nnunet_splits(name: str, plans: dict) -> Tuple[list, Path]:
    """nnU-Net's ``splits_final.json`` of a dataset, created exactly as nnU-Net's trainer would if absent."""
    path = preprocessed_base(name) / "splits_final.json"
    if not path.is_file():
        write_json_atomic(path, default_folds(case_identifiers(configuration_data_folder(name, plans))))
    return json.loads(path.read_text()), path


def default_folds(case_identifiers: list) -> list:
    """nnU-Net's 5-fold split of the cases, as its trainer creates it when ``splits_final.json`` is absent."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    return generate_crossval_split(sorted(case_identifiers), seed=12345, n_splits=5)


def command_path(name: str) -> str:
    """A console script of this environment, even when its bin folder is not on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def nnunet_environment(root: Optional[Path], create: bool = True) -> dict:
    """This process's environment with nnU-Net's folders under ``root`` (created unless ``create`` is
    False), or as the user set them (``root`` None), and nnU-Net's pools sized for small machines unless
    the user sized them."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if root is not None else ():
        env[var] = str(root / var)
        if create:
            Path(env[var]).mkdir(parents=True, exist_ok=True)
    env.setdefault("nnUNet_def_n_proc", "2")   # nnU-Net's export pools, sized for small machines
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_compile", "false")
    return env
