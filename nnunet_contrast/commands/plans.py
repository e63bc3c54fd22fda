"""``nnunet-contrast plans``: a copy of a dataset's plans with presets and settings merged in."""
import copy
import json
from pathlib import Path
from typing import Iterable, List

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.nnunet_env import load_plans, preprocessed_base, write_json_atomic
from nnunet_contrast.settings import (SETTINGS_KEY, all_preset_names, deep_merge, load_preset, preset_configuration,
                                      resolve_settings)


def set_options(assignments: Iterable[str]) -> List[str]:
    """``KEY=VALUE`` assignments as ``nnunet-contrast plans`` takes them: ``--set KEY=VALUE`` each."""
    return [option for assignment in assignments for option in ("--set", assignment)]


def parse_assignment(text: str) -> dict:
    """``a.b.c=VALUE`` -> ``{"a": {"b": {"c": VALUE}}}``; VALUE is JSON, or else a string."""
    if "=" not in text:
        raise UserInputError(f"--set {text!r} is not KEY=VALUE, e.g. --set nnunet_contrast.supconlocal.stride=2")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def build_plans(plans: dict, presets: Iterable[str], assignments: Iterable[str], output_name: str,
                configuration: str = "2d") -> dict:
    """``plans`` with each preset and then each ``--set`` merged into ``configuration``."""
    result = copy.deepcopy(plans)
    for name in presets:
        result = deep_merge(result, {"configurations": {configuration: preset_configuration(load_preset(name),
                                                                                            configuration)}})
    for text in assignments:
        assignment = parse_assignment(text)
        key = next(iter(assignment))
        if key != SETTINGS_KEY and key not in result["configurations"][configuration]:
            raise UserInputError(f"--set {text}: '{key}' is neither a key of the '{configuration}' configuration "
                                 f"nor {SETTINGS_KEY}: did you mean {SETTINGS_KEY}.{text}?")
        result = deep_merge(result, {"configurations": {configuration: assignment}})
    try:
        resolve_settings(result["configurations"][configuration], all_preset_names(), configuration)
    except ValueError as err:
        raise UserInputError(str(err).replace("Fix the plans file or regenerate it with 'nnunet-contrast plans'",
                                              "Fix the --set arguments")) from None
    batch = result["configurations"][configuration].get("batch_size")
    if not isinstance(batch, int) or batch < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch!r}")
    result["plans_name"] = output_name
    return result


def write_plans(dataset: str, presets: List[str], assignments: List[str], output_name: str,
                plans_identifier: str = "nnUNetPlans", configuration: str = "2d", force: bool = False) -> Path:
    if output_name == plans_identifier:
        raise UserInputError(f"-o {output_name} would overwrite the source plans: choose another name, "
                             f"e.g. -o {plans_identifier}_contrast")
    plans = load_plans(dataset, plans_identifier, configuration)
    result = build_plans(plans, presets, assignments, output_name, configuration)
    path = preprocessed_base(dataset) / f"{output_name}.json"
    if path.is_file() and json.loads(path.read_text()) != result and not force:
        raise UserInputError(f"{path} exists with other content: pass --force to replace it, or choose another -o")
    write_json_atomic(path, result)
    return path
