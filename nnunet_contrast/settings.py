"""Hyperparameters in nnU-Net's idiom: a block ``nnunet_contrast`` inside a configuration of the
plans file, filled from presets in ``plans/`` (paper defaults) and overridden per plans file.

Resolution order (later wins): the presets a trainer names (``plans/base.json``, then its
method's preset), then the ``nnunet_contrast`` block of the configuration the run uses.
"""
import copy
import json
from pathlib import Path
from typing import Iterable, List

from nnunet_contrast.losses.class_mean import MATCHINGS
from nnunet_contrast.losses.supcon_local import FORMS, MODES
from nnunet_contrast.resources import bundled_dir

SETTINGS_KEY = "nnunet_contrast"


# value rules, by setting name (a name means the same in every section)
AT_LEAST_ONE = {"num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every", "stride", "block_size",
                "chunk_size", "global_head_hidden", "global_head_dim", "local_head_hidden", "local_head_dim",
                "pixels_per_class", "embedding_dim", "head_hidden", "pseudo_label_rounds", "pretrain_batch_size",
                "partitions", "decoder_blocks", "region_size"}
POSITIVE = {"unlabeled_batch_ratio", "global_temperature", "local_temperature", "temperature", "pretrain_lr"}
BELOW_ONE = {"warmup_fraction"}      # in [0, 1)
AT_MOST_ONE = {"confidence_threshold", "contrast_fraction"}  # in [0, 1]
CHOICES = {"local_mode": MODES, "local_form": FORMS, "matching": MATCHINGS, "global_strategy": ("GR", "GD"),
           "local_strategy": ("LR", "LD")}


def all_preset_names() -> List[str]:
    return sorted(p.stem for p in bundled_dir("plans").glob("*.json"))


def preset_path(name: str) -> Path:
    if name not in all_preset_names():
        raise ValueError(f"unknown preset '{name}'; choose one of {all_preset_names()}")
    return bundled_dir("plans") / f"{name}.json"


def load_preset(name: str) -> dict:
    """A preset: a partial plans file (``{"configurations": {"2d": {...}}}``)."""
    preset = json.loads(preset_path(name).read_text())
    preset.pop("description", None)
    return preset


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` updated recursively with ``override`` (new dict; inputs untouched)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def preset_settings(names: Iterable[str], configuration: str = "2d") -> dict:
    settings: dict = {}
    for name in names:
        block = load_preset(name).get("configurations", {}).get(configuration, {}).get(SETTINGS_KEY, {})
        settings = deep_merge(settings, block)
    return settings


def _same_kind(default, value) -> bool:
    """Whether ``value`` may replace ``default``: same type, except that an int may set a float."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _check_against(defaults: dict, override: dict, where: str, errors: List[str]) -> None:
    for key, value in override.items():
        path = f"{where}.{key}"
        if key not in defaults:
            errors.append(f"unknown setting {path} (known here: {sorted(defaults)})")
        elif isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                errors.append(f"{path} must be a mapping")
            else:
                _check_against(defaults[key], value, path, errors)
        elif not _same_kind(defaults[key], value):
            errors.append(f"{path} must be of type {type(defaults[key]).__name__}, got {value!r}")
        else:
            errors.extend(_value_errors(key, path, value))


def _value_errors(key: str, path: str, value) -> List[str]:
    if key in CHOICES and value not in CHOICES[key]:
        return [f"{path} must be one of {list(CHOICES[key])}, got {value!r}"]
    if key in AT_LEAST_ONE and value < 1:
        return [f"{path} must be at least 1, got {value}"]
    if key in POSITIVE and not value > 0:
        return [f"{path} must be > 0, got {value}"]
    if key in BELOW_ONE and not 0 <= value < 1:
        return [f"{path} must be in [0, 1), got {value}"]
    if key in AT_MOST_ONE and not 0 <= value <= 1:
        return [f"{path} must be in [0, 1], got {value}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return [f"{path} must not be negative, got {value}"]
    return []


def resolve_settings(configuration_dict: dict, presets: Iterable[str], configuration: str = "2d") -> dict:
    """Defaults from ``presets`` overridden by ``configuration_dict[SETTINGS_KEY]``; unknown keys or
    wrong types raise one ValueError naming each of them."""
    defaults = preset_settings(presets, configuration)
    override = configuration_dict.get(SETTINGS_KEY, {})
    if not isinstance(override, dict):
        raise ValueError(f"{SETTINGS_KEY} in the plans must be a mapping of sections, got {override!r}. "
                         f"Fix the plans file or regenerate it with 'nnunet-contrast plans'")
    # Settings of other methods may sit in the same plans file: check every section any preset knows,
    # and keep only the sections this trainer uses.
    errors: List[str] = []
    _check_against(preset_settings(all_preset_names(), configuration), override, SETTINGS_KEY, errors)
    relevant = {k: v for k, v in override.items() if k in defaults}
    if errors:
        raise ValueError("invalid nnunet_contrast settings in the plans file: " + "; ".join(errors)
                         + ". Fix the plans file or regenerate it with 'nnunet-contrast plans'")
    return deep_merge(defaults, relevant)
