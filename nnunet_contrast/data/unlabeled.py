"""Genuinely unlabelled images (no label file at all) joining the unlabelled pool.

They are preprocessed with the dataset's own plans and preprocessor into
``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/``, in the same format as the
training cases. nnU-Net's loaders need a segmentation array per case; we store the preprocessor's
non-zero mask there and no foreground locations. Trainers never read it: unlabelled batches
carry images only (``nnunet_contrast.data.datasets.ImagesOnly``).
"""
import pickle
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.nnunet_env import case_identifiers, configuration_data_folder, dataset_json, load_plans

UNLABELED_SUFFIX = "_unlabeled"


def unlabeled_folder(data_folder: Path) -> Path:
    """Where the added unlabelled cases of a preprocessed configuration folder live."""
    data_folder = Path(data_folder)
    return data_folder.with_name(data_folder.name + UNLABELED_SUFFIX)


def group_channel_files(folder: Path, file_ending: str, num_channels: int) -> Dict[str, List[Path]]:
    """``{case: [channel files]}`` for nnU-Net's naming ``CASE_XXXX<file_ending>``, validated."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserInputError(f"no images in {folder}: pass a folder of CASE_0000{file_ending} files")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: Dict[str, Dict[int, Path]] = defaultdict(dict)
    for path in files:
        if not path.name.endswith(file_ending):
            raise UserInputError(f"{path.name} does not end with the dataset's file ending {file_ending}: "
                                 f"convert it to {file_ending}")
        match = pattern.match(path.name)
        if match is None:
            raise UserInputError(f"{path.name} is not named CASE_XXXX{file_ending} (XXXX = channel): rename it "
                                 f"as nnU-Net expects")
        cases[match.group(1)][int(match.group(2))] = path
    for case, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            raise UserInputError(f"case {case} has channels {sorted(channels)} but the dataset has {num_channels} "
                                 f"channel(s) (_0000 to _{num_channels - 1:04d}): supply exactly those files")
    return {case: [channels[c] for c in range(num_channels)] for case, channels in sorted(cases.items())}


def add_unlabeled_images(dataset: str, input_folder: Path, plans_identifier: str = "nnUNetPlans",
                         configuration: str = "2d") -> List[str]:
    """Preprocess every case of ``input_folder`` into the dataset's unlabelled pool; returns the cases."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    input_folder = Path(input_folder)
    if not input_folder.is_dir():
        raise UserInputError(f"input folder {input_folder} does not exist")
    ds_json = dataset_json(dataset)
    plans = load_plans(dataset, plans_identifier, configuration)
    num_channels = len(ds_json.get("channel_names", ds_json.get("modality", {})))
    cases = group_channel_files(input_folder, ds_json["file_ending"], num_channels)
    data_folder = configuration_data_folder(dataset, plans, configuration)
    clashes = sorted(set(cases) & set(case_identifiers(data_folder)))
    if clashes:
        raise UserInputError(f"case name(s) {clashes[:3]} already belong to the labelled dataset: rename the "
                             f"unlabelled files")
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    target = unlabeled_folder(data_folder)
    target.mkdir(exist_ok=True)
    # preprocess into a scratch folder first, so a failure leaves the pool as it was
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unlabeled_tmp") as scratch:
        for case, files in cases.items():
            out = str(Path(scratch) / case)
            preprocessor.run_case_save(out, [str(f) for f in files], None, plans_manager,
                                       configuration_manager, ds_json)
            _mark_without_foreground(Path(out + ".pkl"))
        for path in sorted(Path(scratch).iterdir()):
            shutil.move(str(path), target / path.name)
    return list(cases)


def _mark_without_foreground(properties_file: Path) -> None:
    """No label, so no foreground locations: nnU-Net's loader then crops at random."""
    with open(properties_file, "rb") as f:
        properties = pickle.load(f)
    properties["class_locations"] = {}
    with open(properties_file, "wb") as f:
        pickle.dump(properties, f)
