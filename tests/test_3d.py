"""nnU-Net's 3d_fullres configuration on the embedded sample: every trainer has a 3D form (docs/methods.md,
"Configurations"), builds nnU-Net's 3D PlainConvUNet (IDEAL: with its second decoder) and trains each stage without
reading the labels of unlabelled cases (a step of each stage on ResEnc 3D: test_resenc.py); the 2D-only settings
(G^D, L^D) refuse in one line before nnU-Net writes anything.
nnUNetv2_train 4 3d_fullres and nnUNetv2_predict -c 3d_fullres with SelfTraining ran by hand on the sample (2026-12-06),
not here: the suite's time limit."""
import json
import math

import pytest

from conftest import (ALL_PIXELS_3D, PLAIN, PLANS_3D, RESENC, RESENC_PLANS_3D, corrupt_images, corrupt_labels,
                      every_stage_once, losses_with_hidden_labels_corrupted, make_trainer, self_training_losses,
                      split_of_fold0)
from nnunet_contrast.training.schedule import PSEUDO_LABEL


@pytest.mark.parametrize("trainer", ["nnUNetTrainerLabeledOnly", "nnUNetTrainerLabeledOnlyTwiceIterations",
                                     "nnUNetTrainerSelfTraining", "nnUNetTrainerCopyPaste",
                                     "nnUNetTrainerGlobalContrast", "nnUNetTrainerGlobalContrastSelfTraining",
                                     "nnUNetTrainerSupConLocal", "nnUNetTrainerSupConLocalSelfTraining",
                                     "nnUNetTrainerPseudoLabelContrast", "nnUNetTrainerPseudoLabelContrastInter",
                                     "nnUNetTrainerPseudoLabelContrastSelfTraining",
                                     "nnUNetTrainerPseudoLabelContrastInterSelfTraining",
                                     "nnUNetTrainerIDEAL", "nnUNetTrainerIDEALSelfTraining",
                                     "nnUNetTrainerCrossLevel", "nnUNetTrainerCrossLevelSelfTraining",
                                     "nnUNetTrainerGlobalLocalContrast", "nnUNetTrainerGlobalLocalContrastSelfTraining"])
def test_trainers_with_a_3d_form_build_nnunets_3d_network(preprocessed_3d, trainer):
    built = make_trainer(trainer, PLANS_3D, configuration="3d_fullres")
    built.initialize()
    assert type(built.network).__name__ in PLAIN and built.network.encoder.conv_op.__name__ == "Conv3d"


@pytest.mark.parametrize("trainer", ["nnUNetTrainerSelfTraining", "nnUNetTrainerCopyPaste"])
def test_labels_of_unlabelled_cases_never_reach_a_3d_self_training_loss(preprocessed_3d, tmp_path, trainer):
    split = split_of_fold0(preprocessed_3d)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        preprocessed_3d, tmp_path, lambda: self_training_losses(trainer, ALL_PIXELS_3D, "selftrain", "3d_fullres"),
        split["unlabeled"], lambda folder, saved: corrupt_images(folder, split["unlabeled"], saved), "3d_fullres")
    assert hidden == reference
    assert reference[PSEUDO_LABEL] > 0 and changed[PSEUDO_LABEL] != reference[PSEUDO_LABEL]


@pytest.mark.parametrize("trainer, labelled_terms", [
    # SupConLocal's global stage reads unlabelled volumes, its local stage and fine-tuning the labelled ones
    ("nnUNetTrainerSupConLocal", {"local": "local_contrast", "finetune": "segmentation"}),
    # G^R and L^R read every case's images and no label
    ("nnUNetTrainerGlobalLocalContrast", {"finetune": "segmentation"}),
    ("nnUNetTrainerGlobalContrast", {"finetune": "segmentation"}),
    # the stages that read labelled and unlabelled volumes together: pseudo-labels, cells and the second decoder
    ("nnUNetTrainerPseudoLabelContrast", {"warmup": "segmentation", "joint": "segmentation"}),
    ("nnUNetTrainerIDEAL", {"finetune": "segmentation"}),
    ("nnUNetTrainerCrossLevel", {"contrast": "segmentation", "consistency": "segmentation"}),
    ("nnUNetTrainerCopyPaste", {"warmup": "segmentation", "selftrain": "segmentation"}),
])
def test_labels_of_unlabelled_cases_never_reach_a_3d_method_loss(preprocessed_3d, tmp_path, trainer, labelled_terms):
    """A step of each stage of each method in 3D, on nnU-Net's ResidualEncoderUNet (the ResEnc M plans): finite
    terms that never read an unlabelled case's label. (The ``...SelfTraining`` variants put SelfTraining's stages,
    checked above, after these.)"""
    split = split_of_fold0(preprocessed_3d)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        preprocessed_3d, tmp_path, lambda: every_stage_once(trainer, RESENC_PLANS_3D, "3d_fullres", RESENC),
        split["unlabeled"], lambda folder, saved: corrupt_labels(folder, split["labeled"], saved), "3d_fullres")
    assert hidden == reference and all(math.isfinite(v) for terms in reference.values() for v in terms.values())
    for stage, term in labelled_terms.items():  # control: the labelled volumes' labels do count
        assert reference[stage][term] > 0 and changed[stage][term] != reference[stage][term], (stage, term)


@pytest.mark.parametrize("setting", ["global_strategy=GD", "local_strategy=LD"])
def test_partitions_of_slices_are_refused_in_3d_in_one_line(preprocessed_3d, setting):
    """G^D / L^D need a 2D slice's position in its volume; in 3D the refusal names G^R / L^R, before nnU-Net
    writes anything."""
    trainer, plans = "nnUNetTrainerGlobalLocalContrast", f"nnUNetPlans_test3d_{setting[-2:].lower()}"
    preprocessed_3d.run("nnunet-contrast", "plans", "-d", "4", "-c", "3d_fullres", "-p", PLANS_3D, "-o", plans,
                        "--set", f"nnunet_contrast.globallocal.{setting}", "--force")
    result = preprocessed_3d.run("nnUNetv2_train", "4", "3d_fullres", "0", "-tr", trainer, "-p", plans, "-device", "cpu",
                                 check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"{trainer}: {setting} group 2D slices by their position in the volume" in last
    assert last.endswith("set nnunet_contrast.globallocal.global_strategy=GR and local_strategy=LR in the plans")
    assert not (preprocessed_3d.results / f"{trainer}__{plans}__3d_fullres").exists()


def test_embed_draws_the_voxel_embeddings_of_a_3d_model(preprocessed_3d, tmp_path):
    """``nnunet-contrast embed -c 3d_fullres`` on a 3D model folder as nnU-Net writes it (plans, dataset and the
    final checkpoint of an initialised LabeledOnly: the picture needs no trained weights)."""
    trainer = make_trainer("nnUNetTrainerLabeledOnly", PLANS_3D, configuration="3d_fullres")
    trainer.on_train_start()
    trainer.on_train_end()
    picture = tmp_path / "3d.png"
    result = preprocessed_3d.run("nnunet-contrast", "embed", "-d", "4", "-tr", "nnUNetTrainerLabeledOnly", "-p",
                                 PLANS_3D, "-c", "3d_fullres", "-f", "0", "-i", preprocessed_3d.heldout,
                                 "-l", preprocessed_3d.heldout_labels, "-o", picture, "--pixels", "40")
    assert picture.read_bytes()[:4] == b"\x89PNG" and "silhouette of the classes" in result.stdout


def test_3d_lowres_trains_and_the_cascade_is_refused_in_one_line_naming_3d_fullres(preprocessed_3d):
    """nnU-Net's planner writes 3d_lowres (a 3D configuration at a coarser spacing; here on 3d_fullres's data, as the
    sample is too small for the planner to write one) and 3d_cascade_fullres, which needs 3d_lowres's predictions."""
    folder = preprocessed_3d.preprocessed
    plans = json.loads((folder / f"{PLANS_3D}.json").read_text())
    plans["plans_name"] = name = "nnUNetPlans_test3d_cascade"
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    (folder / f"{name}.json").write_text(json.dumps(plans))
    trainer = "nnUNetTrainerSelfTraining"
    terms = every_stage_once(trainer, name, "3d_lowres")
    assert terms.keys() == {"warmup", "selftrain"} and all(math.isfinite(v) for t in terms.values() for v in t.values())
    result = preprocessed_3d.run("nnUNetv2_train", "4", "3d_cascade_fullres", "0", "-tr", trainer, "-p", name,
                                 "-device", "cpu", check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith(
        f"{trainer} does not train nnU-Net's cascade ('3d_cascade_fullres' needs the predictions of '3d_lowres'): "
        f"train 3d_fullres (nnUNetv2_train DATASET 3d_fullres FOLD -tr {trainer})")
    assert not (preprocessed_3d.results / f"{trainer}__{name}__3d_cascade_fullres").exists()
