"""Hyperparameters in nnU-Net's idiom: a block ``nnunet_contrast`` inside a configuration of the
plans file, filled from presets in ``plans/`` (paper defaults) and overridden per plans file.

A preset's ``2d`` block holds the settings of every configuration (a method's hyperparameters do not
depend on the network's dimension); its block of another configuration (``3d_fullres``) adds what
differs there, nnU-Net's own keys such as ``batch_size`` included (``preset_configuration``).

Resolution order (later wins): the presets a trainer names (``plans/base.json``, then its
method's preset), then the ``nnunet_contrast`` block of the configuration the run uses, then what
a trainer variant fixes. The values live in the presets; their types and allowed ranges live here,
one frozen dataclass per section, and ``resolve_settings`` is the one place that checks them.
"""
import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from nnunet_contrast.data.mixing import MIXINGS, WARMUP_MIXINGS
from nnunet_contrast.training.thresholds import THRESHOLDS
from nnunet_contrast.losses.class_mean import MATCHINGS
from nnunet_contrast.losses.supcon_local import FORMS, MODES
from nnunet_contrast.resources import bundled_dir

SETTINGS_KEY = "nnunet_contrast"
BASE_CONFIGURATION = "2d"  # presets' settings for every configuration (see preset_configuration)
FIX_PLANS = "Fix the plans file or regenerate it with 'nnunet-contrast plans'"
# run.finetune: the method's own last stages, nnU-Net's fine-tuning, or self-training (training/self_training.py)
FINETUNE_KINDS = ("method", "nnunet", "selftraining")


# ----------------------------------------------------------------------------- value rules
@dataclass(frozen=True)
class Rule:
    """What a numeric or text setting may be; numbers are never negative unless ``minimum`` says so."""
    minimum: Optional[float] = None
    positive: bool = False
    below_one: bool = False    # in [0, 1)
    at_most_one: bool = False  # in [0, 1]
    choices: Tuple = ()

    def errors(self, path: str, value) -> List[str]:
        if self.choices and value not in self.choices:
            return [f"{path} must be one of {list(self.choices)}, got {value!r}"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return []
        if self.minimum is not None and value < self.minimum:
            return [f"{path} must be at least {self.minimum}, got {value}"]
        if self.positive and not value > 0:
            return [f"{path} must be > 0, got {value}"]
        if self.below_one and not 0 <= value < 1:
            return [f"{path} must be in [0, 1), got {value}"]
        if self.at_most_one and not 0 <= value <= 1:
            return [f"{path} must be in [0, 1], got {value}"]
        if self.minimum is None and value < 0:
            return [f"{path} must not be negative, got {value}"]
        return []


def setting(**rule) -> dataclasses.Field:
    """A field of a settings section, with its value rule (see ``Rule``); no default: presets give them."""
    return field(metadata={"rule": Rule(**rule)})


AT_LEAST_ONE = dict(minimum=1)
POSITIVE = dict(positive=True)


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Budget:
    num_epochs: int = setting()
    num_iterations_per_epoch: int = setting(**AT_LEAST_ONE)
    num_val_iterations_per_epoch: int = setting(**AT_LEAST_ONE)
    save_every: int = setting(**AT_LEAST_ONE)


@dataclass(frozen=True)
class SemiSup:
    split_file: str = setting()
    unlabeled_batch_ratio: float = setting(**POSITIVE)


@dataclass(frozen=True)
class Run:
    seed: int = setting(minimum=-1)      # -1: unseeded, as nnU-Net itself
    finetune: str = setting(choices=FINETUNE_KINDS)


@dataclass(frozen=True)
class SelfTraining:
    """The self-training stage any trainer can fine-tune with (``run.finetune = selftraining``)."""
    warmup_fraction: float = setting(below_one=True)   # of budget.num_epochs: nnU-Net's supervised training first
    warmup_mixing: str = setting(choices=WARMUP_MIXINGS)  # copypaste: BCP's copy-paste between labelled images
    ema_decay: float = setting(below_one=True)
    confidence_threshold: float = setting(at_most_one=True)  # threshold fixed: the softmax cut-off
    threshold: str = setting(choices=THRESHOLDS)  # training/thresholds.py
    threshold_momentum: float = setting(below_one=True)  # threshold self_adaptive: m of FreeMatch's averages
    teacher_min_dice: float = setting(at_most_one=True)  # > 0: pseudo-labels once the teacher's labelled Dice reaches it
    reliable_start: float = setting(positive=True, at_most_one=True)  # share of each unlabelled batch kept at first
    reliable_growth: float = setting(at_most_one=True)  # of the self-training iterations: the share reaches 1
    unlabeled_weight: float = setting()
    rampup_fraction: float = setting(at_most_one=True)  # of the self-training iterations: sigmoid ramp-up
    mixing: str = setting(choices=MIXINGS)
    box_fraction: float = setting(positive=True, at_most_one=True)  # copypaste: box side / patch side
    strong_intensity: bool = setting()
    predict_with: str = setting(choices=("student", "teacher"))


@dataclass(frozen=True)
class GlobalLocalStages:
    """What SupConLocal and GlobalLocal share: a global and a local pretraining stage with Adam, an MLP
    head on the pooled bottleneck and a dense head on a decoder stage."""
    global_epochs: int = setting()
    local_epochs: int = setting()
    pretrain_iterations_per_epoch: int = setting()
    global_head_hidden: int = setting(**AT_LEAST_ONE)
    global_head_dim: int = setting(**AT_LEAST_ONE)
    local_head_hidden: int = setting(**AT_LEAST_ONE)
    local_head_dim: int = setting(**AT_LEAST_ONE)
    pretrain_lr: float = setting(**POSITIVE)
    pretrain_weight_decay: float = setting()


@dataclass(frozen=True)
class SupConLocal(GlobalLocalStages):
    global_temperature: float = setting(**POSITIVE)
    local_temperature: float = setting(**POSITIVE)
    local_mode: str = setting(choices=MODES)
    local_images: int = setting()
    stride: int = setting(**AT_LEAST_ONE)
    block_size: int = setting(**AT_LEAST_ONE)
    chunk_size: int = setting(**AT_LEAST_ONE)
    local_form: str = setting(choices=FORMS)


@dataclass(frozen=True)
class PseudoLabel:
    warmup_fraction: float = setting(below_one=True)
    pseudo_label_rounds: int = setting(**AT_LEAST_ONE)
    lambda_cont: float = setting()
    temperature: float = setting(**POSITIVE)
    matching: str = setting(choices=MATCHINGS)
    pixels_per_class: int = setting(**AT_LEAST_ONE)
    embedding_dim: int = setting(**AT_LEAST_ONE)
    head_hidden: int = setting(**AT_LEAST_ONE)
    background_negative: bool = setting()
    min_flip_agreement: float = setting(at_most_one=True)  # per image: the flip-consistency Dice
    labeller: str = setting(choices=("snapshot", "teacher"))  # teacher: selftraining's EMA teacher and threshold


@dataclass(frozen=True)
class GlobalLocal(GlobalLocalStages):
    pretrain_batch_size: int = setting(**AT_LEAST_ONE)
    global_strategy: str = setting(choices=("GR", "GD"))
    local_strategy: str = setting(choices=("LR", "LD"))
    partitions: int = setting(**AT_LEAST_ONE)
    temperature: float = setting(**POSITIVE)
    decoder_blocks: int = setting(**AT_LEAST_ONE)
    keep_output_blocks: int = setting()  # last decoder stages the local stage never trains (0: the paper)
    region_size: int = setting(**AT_LEAST_ONE)


@dataclass(frozen=True)
class CrossLevel:
    grid: int = setting()
    min_cell_strides: int = setting(**AT_LEAST_ONE)  # grid 0: cells of at least this many total strides per side
    contrast_fraction: float = setting(at_most_one=True)
    alpha: float = setting()
    beta: float = setting()
    temperature: float = setting(**POSITIVE)
    embedding_dim: int = setting(**AT_LEAST_ONE)
    head_hidden: int = setting(**AT_LEAST_ONE)


@dataclass(frozen=True)
class IDEAL:
    pretrain_epochs: int = setting()
    pretrain_iterations_per_epoch: int = setting()
    pretrain_lr: float = setting(**POSITIVE)
    pretrain_weight_decay: float = setting()
    temperature: float = setting(**POSITIVE)
    embedding_dim: int = setting(**AT_LEAST_ONE)
    head_hidden: int = setting(**AT_LEAST_ONE)
    sampled_positions: int = setting()
    lambda_cps: float = setting()
    cps_rampup_fraction: float = setting(at_most_one=True)  # sigmoid ramp of lambda_cps (0: none, the poster)


SECTIONS: Dict[str, type] = {"budget": Budget, "semisup": SemiSup, "run": Run, "selftraining": SelfTraining,
                             "supconlocal": SupConLocal,
                             "pseudolabel": PseudoLabel, "globallocal": GlobalLocal, "crosslevel": CrossLevel,
                             "ideal": IDEAL}


SHARED_SECTIONS = ("budget", "semisup", "run", "selftraining")  # resolved for every trainer


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one run: the shared sections and the trainer's method section (or None)."""
    budget: Budget
    semisup: SemiSup
    run: Run
    selftraining: SelfTraining
    method: Optional[object] = None
    method_key: str = ""

    def as_dict(self) -> dict:
        """Section -> key -> value, as in the plans file (saved beside each run and in its checkpoint)."""
        sections = {name: getattr(self, name) for name in SHARED_SECTIONS}
        if self.method is not None:
            sections[self.method_key] = self.method
        return {name: dataclasses.asdict(section) for name, section in sections.items()}


# ----------------------------------------------------------------------------- presets
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


def preset_configuration(preset: dict, configuration: str) -> dict:
    """What ``preset`` merges into ``configuration`` of a plans file: its ``2d`` block there, and elsewhere
    the settings of its ``2d`` block updated with its own block of ``configuration`` (if any)."""
    blocks = preset.get("configurations", {})
    base = blocks.get(BASE_CONFIGURATION, {})
    if configuration == BASE_CONFIGURATION:
        return copy.deepcopy(base)
    shared = {SETTINGS_KEY: base[SETTINGS_KEY]} if SETTINGS_KEY in base else {}
    return deep_merge(shared, blocks.get(configuration, {}))


def preset_settings(names: Iterable[str], configuration: str = BASE_CONFIGURATION) -> dict:
    settings: dict = {}
    for name in names:
        settings = deep_merge(settings, preset_configuration(load_preset(name), configuration).get(SETTINGS_KEY, {}))
    return settings


# ----------------------------------------------------------------------------- checking
def _type_errors(path: str, kind: type, value) -> List[str]:
    """A value of the field's type; an int may set a float, and a bool is no number."""
    if kind is bool or isinstance(value, bool):
        ok = kind is bool and isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, kind)
    return [] if ok else [f"{path} must be of type {kind.__name__}, got {value!r}"]


def section_errors(name: str, values, where: str = SETTINGS_KEY) -> List[str]:
    """Every problem of the (partial) section ``name`` given as ``values``, one message each."""
    path = f"{where}.{name}"
    if name not in SECTIONS:
        return [f"unknown setting {path} (known here: {sorted(SECTIONS)})"]
    if not isinstance(values, dict):
        return [f"{path} must be a mapping"]
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[name])}
    errors: List[str] = []
    for key, value in values.items():
        if key not in fields:
            errors.append(f"unknown setting {path}.{key} (known here: {sorted(fields)})")
            continue
        kind_errors = _type_errors(f"{path}.{key}", fields[key].type, value)
        errors.extend(kind_errors or fields[key].metadata["rule"].errors(f"{path}.{key}", value))
    return errors


def build_section(name: str, values: dict):
    """The typed section from complete ``values`` (checked); ints given for floats become floats."""
    kinds = {f.name: f.type for f in dataclasses.fields(SECTIONS[name])}
    missing = sorted(set(kinds) - set(values))
    if missing:
        raise ValueError(f"the presets leave {SETTINGS_KEY}.{name}.{missing[0]} unset: reinstall nnunet-contrast")
    return SECTIONS[name](**{k: float(v) if kinds[k] is float else v for k, v in values.items()})


def resolve_settings(configuration_dict: dict, presets: Iterable[str], configuration: str = BASE_CONFIGURATION,
                     method_key: str = "", fixed: Optional[dict] = None) -> Settings:
    """Defaults from ``presets``, overridden by ``configuration_dict[SETTINGS_KEY]`` and then by ``fixed``
    (what a trainer variant fixes). Unknown keys, wrong types or values raise one ValueError naming each.

    Settings of other methods may sit in the same plans file: every section is checked, and only
    the shared sections and ``method_key``'s are kept.
    """
    override = configuration_dict.get(SETTINGS_KEY, {})
    if not isinstance(override, dict):
        raise ValueError(f"{SETTINGS_KEY} in the plans must be a mapping of sections, got {override!r}. {FIX_PLANS}")
    errors = [e for name, values in override.items() for e in section_errors(name, values)]
    if errors:
        raise ValueError(f"invalid {SETTINGS_KEY} settings in the plans file: " + "; ".join(errors) + f". {FIX_PLANS}")
    merged = deep_merge(deep_merge(preset_settings(presets, configuration), override), fixed or {})
    sections = {name: build_section(name, merged[name]) for name in SHARED_SECTIONS}
    method = build_section(method_key, merged[method_key]) if method_key else None
    return Settings(**sections, method=method, method_key=method_key)
