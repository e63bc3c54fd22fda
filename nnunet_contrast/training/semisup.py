"""nnUNetTrainer with a semi-supervised split, an unlabelled pool, settings from the plans and an
optional training seed."""
import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_contrast.distributed import gather_objects, rank_seed, world_size
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.data.datasets import ImagesOnly, UnionDataset, folder_dataset
from nnunet_contrast.data.split import fold_split, read_split
from nnunet_contrast.data.unlabeled import unlabeled_folder
from nnunet_contrast.settings import Budget, Settings, resolve_settings
from nnunet_contrast.training.checkpoint_io import EXTRAS_KEY, extras_added_on_save, loaded_checkpoint_served
from nnunet_contrast.training.seeding import (UNLABELED_STREAM, random_state, seed_process, seeded_workers,
                                              set_random_state)

SETTINGS_FILE = "nnunet_contrast_settings.json"


class SemiSupervisedTrainer(nnUNetTrainer):
    """Trains on the labelled cases of the split and offers unlabelled batches (images only).

    * ``presets``: the files in ``plans/`` that give this trainer's default settings.
    * ``method_key``: the trainer's own settings section (``settings.method``), if any.
    * ``variant_settings``: what a trainer variant fixes whatever the plans say (its name says
      what differs, as for nnU-Net's own variants), e.g. ``{"pseudolabel": {"matching": "inter"}}``.
    * ``uses_unlabeled``: reads images of unlabelled cases (datasets with an ignore label are refused).
    * ``requires_unlabeled``: fail at start when the unlabelled pool is empty.
    * ``spatial_dims``: the network dimensions the method has a form for (docs/methods.md; both by default);
      other configurations are refused at start.
    * The budget (epochs, iterations, checkpoint interval) comes from the settings; ``run.seed`` >= 0
      seeds the run (``seed_run``).
    """

    presets = ("base",)
    method_key = ""
    variant_settings: dict = {}
    uses_unlabeled = True
    requires_unlabeled = False
    spatial_dims: Tuple[int, ...] = (2, 3)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # checked before nnU-Net's __init__, which creates the output folder and log
        self.settings: Settings = self.check_supported(PlansManager(plans), configuration, dataset_json)
        self.plan_run()
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net sets cuda:rank under DDP; a CPU process group (gloo, the tests) trains on the CPU
            self.device, self.grad_scaler = device, None
        self.apply_budget(self.settings.budget)
        self.seed_run()
        self.labeled_keys: List[str] = []
        self.unlabeled_keys: List[str] = []
        self.dataloader_unlabeled: Optional[ImagesOnly] = None
        self.last_unlabeled_keys = None  # the case of each image of the last unlabelled batch
        self.resumed_random_state: Optional[dict] = None
        self.rank_random_states: List[dict] = []  # every rank's, gathered for the checkpoint rank 0 writes

    @classmethod
    def check_supported(cls, plans_manager: "PlansManager", configuration: str, dataset_json: dict) -> Settings:
        """One-line errors for what this trainer cannot train; returns the resolved settings."""
        name = cls.__name__
        config = plans_manager.get_configuration(configuration)
        if config.previous_stage_name is not None:
            raise UserInputError(f"{name} does not train nnU-Net's cascade ('{configuration}' needs the predictions of "
                                 f"'{config.previous_stage_name}'): train 3d_fullres (nnUNetv2_train DATASET "
                                 f"3d_fullres FOLD -tr {name})")
        if len(config.patch_size) not in cls.spatial_dims:
            raise UserInputError(f"{name} has no {len(config.patch_size)}D form yet, and '{configuration}' is "
                                 f"{len(config.patch_size)}D: train the 2d configuration (nnUNetv2_train DATASET 2d "
                                 f"FOLD -tr {name})")
        if cls.uses_unlabeled and plans_manager.get_label_manager(dataset_json).has_ignore_label:
            # nnU-Net's loader picks crops from the annotated area of an image when an ignore label
            # exists, which for unlabelled cases would mean reading their hidden labels
            raise UserInputError(f"{name} does not support datasets with an ignore label yet: train "
                                 f"nnUNetTrainerLabeledOnly, or a dataset without 'ignore' in its labels")
        try:
            return resolve_settings(config.configuration, cls.presets, configuration, cls.method_key,
                                    cls.variant_settings)
        except ValueError as error:
            raise UserInputError(str(error)) from None

    def plan_run(self) -> None:
        """What a subclass decides from the settings alone, before nnU-Net creates the output folder (so
        that a one-line refusal leaves nothing behind)."""

    @property
    def patch_dims(self) -> int:
        """The spatial axes of the configuration's patches: 2 or 3."""
        return len(self.configuration_manager.patch_size)

    # ----------------------------------------------------------------- settings
    def apply_budget(self, budget: Budget) -> None:
        self.num_epochs = budget.num_epochs
        self.num_iterations_per_epoch = budget.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = budget.num_val_iterations_per_epoch
        self.save_every = budget.save_every

    def report_settings(self) -> None:
        text = json.dumps(self.settings.as_dict(), indent=2)
        self.print_to_log_file(f"nnunet-contrast settings of {type(self).__name__}:\n{text}", add_timestamp=False)
        if self.variant_settings:
            self.print_to_log_file(f"fixed by the trainer variant, whatever the plans say: "
                                   f"{json.dumps(self.variant_settings)}", add_timestamp=False)
        if self.local_rank == 0:
            Path(self.output_folder, SETTINGS_FILE).write_text(text + "\n")

    # ----------------------------------------------------------------- data
    @property
    def split_file(self) -> Path:
        return Path(self.preprocessed_dataset_folder_base, self.settings.semisup.split_file)

    def added_unlabeled_dataset(self):
        return folder_dataset(unlabeled_folder(Path(self.preprocessed_dataset_folder)))

    def do_split(self):
        """nnU-Net's split, with the training cases reduced to the labelled ones of our split."""
        train_keys, val_keys = super().do_split()
        added = self.added_unlabeled_dataset()
        n_added = len(added.identifiers) if added is not None else 0
        if self.split_file.is_file() and self.fold == "all":
            raise UserInputError(f"fold 'all' has no semi-supervised split in {self.split_file.name}: train the "
                                 f"folds 0-4 it defines")
        if self.split_file.is_file():
            split = read_split(self.split_file)
            self.labeled_keys, self.unlabeled_keys = fold_split(split, self.fold, train_keys, str(self.split_file))
            self.print_to_log_file(f"Semi-supervised split {self.split_file.name}: {len(self.labeled_keys)} labelled "
                                   f"and {len(self.unlabeled_keys)} unlabelled training cases, plus {n_added} added "
                                   f"unlabelled image(s); {len(val_keys)} validation cases as nnU-Net defines them.")
        else:
            self.labeled_keys, self.unlabeled_keys = list(train_keys), []
            self.print_to_log_file(f"No semi-supervised split file ({self.split_file}): all {len(train_keys)} training "
                                   f"cases count as labelled; the unlabelled pool is the {n_added} added unlabelled "
                                   f"image(s). Create a split with 'nnunet-contrast split'.")
        if self.requires_unlabeled and not self.unlabeled_keys and n_added == 0:
            raise UserInputError(f"{type(self).__name__} needs unlabelled images but found none: create a split with "
                                 f"'nnunet-contrast split' or add images with 'nnunet-contrast add-unlabeled'")
        return self.labeled_keys, val_keys

    def unlabeled_dataset(self):
        parts = [folder_dataset(Path(self.preprocessed_dataset_folder), self.unlabeled_keys)
                 if self.unlabeled_keys else None, self.added_unlabeled_dataset()]
        parts = [p for p in parts if p is not None]
        return UnionDataset(parts) if parts else None

    def labeled_dataset(self):
        return folder_dataset(Path(self.preprocessed_dataset_folder), self.labeled_keys)

    def all_images_dataset(self) -> UnionDataset:
        """Labelled and unlabelled training cases and added images (for label-free pretraining)."""
        return UnionDataset([p for p in (self.labeled_dataset(), self.unlabeled_dataset()) if p is not None])

    @property
    def unlabeled_batch_size(self) -> int:
        return max(1, int(round(self.batch_size * self.settings.semisup.unlabeled_batch_ratio)))

    def reads_unlabeled_batches(self) -> bool:
        """Whether the run draws unlabelled batches (``next_unlabeled_images``)."""
        return False

    def get_dataloaders(self):
        train, val = (self.seeded_augmenter(loader, index) for index, loader in enumerate(super().get_dataloaders()))
        dataset = self.unlabeled_dataset() if self.uses_unlabeled and self.reads_unlabeled_batches() else None
        self.dataloader_unlabeled = self.build_image_loader(dataset, self.unlabeled_batch_size, UNLABELED_STREAM) \
            if dataset is not None else None
        return train, val

    def build_image_loader(self, dataset, batch_size: int, stream: int, loader_class=nnUNetDataLoader,
                           **loader_kwargs) -> ImagesOnly:
        """nnU-Net's training augmentation and worker processes over ``dataset``, images only; a seeded run's
        workers draw from seed stream ``stream`` (``training/seeding.py``).

        Foreground oversampling is off: it would pick crops using labels that may be hidden.
        """
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        loader = loader_class(dataset, batch_size, initial_patch_size, patch_size, self.label_manager,
                              oversample_foreground_percent=0.0, transforms=transforms, **loader_kwargs)
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return ImagesOnly(SingleThreadedAugmenter(loader, None))
        if self.settings.run.seed >= 0:
            return ImagesOnly(self.seeded_workers(loader, processes, stream))
        return ImagesOnly(NonDetMultiThreadedAugmenter(loader, None, processes, max(6, processes // 2), None,
                                                       pin_memory=self.device.type == "cuda", wait_time=0.002))

    # ----------------------------------------------------------------- seed
    def seed_run(self) -> None:
        """Under DDP each rank draws its own augmentations and batches: a seed per rank, or, unseeded, torch's
        own generator from the operating system (numpy's and Python's are already)."""
        if self.settings.run.seed >= 0:
            seed_process(rank_seed(self.settings.run.seed))
        elif self.is_ddp:
            torch.seed()

    def seeded_workers(self, loader, processes: int, stream: int):
        return seeded_workers(loader, processes, self.settings.run.seed, stream, self.device.type == "cuda",
                              self.local_rank if self.is_ddp else None)

    def seeded_augmenter(self, augmenter, stream: int):
        """nnU-Net's train (0) or validation (1) augmenter, replaced by seeded workers over the same
        loader when the run is seeded (nnU-Net starts its own unseeded)."""
        if self.settings.run.seed < 0 or not isinstance(augmenter, NonDetMultiThreadedAugmenter):
            return augmenter
        augmenter._finish()
        seeded = self.seeded_workers(augmenter.generator, augmenter.num_processes, stream)
        next(seeded)  # started, as nnU-Net starts its own
        return seeded

    def next_unlabeled_images(self) -> Optional[torch.Tensor]:
        """The next unlabelled batch's images; its case keys stay in ``last_unlabeled_keys`` (the case ranking)."""
        if self.dataloader_unlabeled is None:
            return None
        batch = next(self.dataloader_unlabeled)
        self.last_unlabeled_keys = batch.get("keys")
        return batch["data"]

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_extras(self) -> dict:
        """What we add to nnU-Net's checkpoint under the key ``nnunet_contrast`` (subclasses add more):
        the random generators of every rank (gathered by ``save_checkpoint``), so that ``--c`` draws what
        the uninterrupted run would have drawn (exactly so with in-process data loading, nnUNet_n_proc_DA=0)."""
        return {"rank_random_states": self.rank_random_states}

    def restore_extras(self, extras: dict, current_epoch: int) -> None:
        """Runs before nnU-Net restores weights and optimizer state from a checkpoint; each rank takes
        its own random state back (none from a checkpoint of another number of ranks)."""
        states = extras["rank_random_states"]
        self.resumed_random_state = states[self.local_rank] if len(states) == world_size() else None

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint with our extras under ``EXTRAS_KEY``, written once and atomically.
        Heads stay outside ``network_weights``: nnUNetv2_predict and ``-pretrained_weights`` see a
        plain nnU-Net network."""
        self.rank_random_states = gather_objects(random_state())  # every rank calls save_checkpoint, rank 0 writes
        with extras_added_on_save(self.checkpoint_extras, filename) as saved:
            super().save_checkpoint(filename)
        if not saved and self.local_rank == 0 and not self.disable_checkpointing:
            raise RuntimeError(f"nnU-Net saved {filename} without torch.save(checkpoint, filename), so nnunet-contrast "
                               f"could not add its extras: use nnunetv2 2.8 (pip install 'nnunetv2>=2.8,<2.9')")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError(f"{type(self).__name__}.load_checkpoint expects a checkpoint file name")
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        self.restore_extras(checkpoint.get(EXTRAS_KEY, {}), checkpoint["current_epoch"])
        with loaded_checkpoint_served(filename_or_checkpoint, checkpoint):
            super().load_checkpoint(filename_or_checkpoint)

    # ----------------------------------------------------------------- hooks
    def on_train_start(self):
        super().on_train_start()
        self.report_settings()
        if self.resumed_random_state is not None:
            # after nnU-Net's start, whose loaders draw a first batch in the uninterrupted run too
            set_random_state(self.resumed_random_state)
            self.resumed_random_state = None

    def on_train_end(self):
        super().on_train_end()
        if self.dataloader_unlabeled is not None:
            self.dataloader_unlabeled.finish()
        for loader in self.extra_loaders():
            loader.finish()

    def extra_loaders(self) -> List[ImagesOnly]:
        """Loaders a subclass builds besides nnU-Net's and the unlabelled one (finished at the end)."""
        return []
