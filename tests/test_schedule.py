"""The schedule model on its own: stage boundaries, optimizer spans, names, weights; and the
settings' typed sections."""
import math

import pytest

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.settings import SECTIONS, section_errors
from nnunet_contrast.training.method import MethodTrainer
from nnunet_contrast.training.schedule import (ENCODER, NETWORK, SEGMENTATION, Adam, Data, Head, NnUNetSGD, Part,
                                               Schedule, Stage, Term, replace_finetuning, sigmoid_rampup)


def stage(name, epochs, optimizer=NnUNetSGD(), trains=(NETWORK,), terms=(Term(SEGMENTATION),), data=Data.LABELED):
    return Stage(name, epochs, 2, trains, optimizer, terms, data)


def test_stage_boundaries_and_lookup():
    schedule = Schedule([stage("a", 2, Adam(1e-3)), stage("empty", 0), stage("b", 3)])
    assert [s.name for s in schedule.stages] == ["a", "b"]  # a stage without epochs is left out
    assert schedule.starts == [0, 2] and schedule.total_epochs == 5
    assert [schedule.index_at(e) for e in range(7)] == [0, 0, 1, 1, 1, 1, 1]  # past the end: the last stage
    assert schedule.index_of("b") == 1 and schedule.stage("b").epochs == 3


def test_the_pretraining_ends_at_the_first_supervised_stage_after_unsupervised_ones():
    contrast = (Term("global_contrast"),)
    assert Schedule([stage("global", 1, terms=contrast), stage("local", 1, terms=contrast),
                     stage("finetune", 2)]).pretraining_end == 2
    assert Schedule([stage("global", 0, terms=contrast), stage("finetune", 2)]).pretraining_end is None  # no epochs
    assert Schedule([stage("warmup", 1), stage("joint", 2, terms=(Term(SEGMENTATION), Term("contrast")))]
                    ).pretraining_end is None  # supervised from the first epoch
    assert Schedule([stage("dense", 1, terms=contrast)]).pretraining_end is None  # nothing to fine-tune


def test_rounds_of_one_name_share_a_shade_and_an_optimizer():
    joint = (Term(SEGMENTATION), Term("contrast", 0.1))
    schedule = Schedule([stage("warmup", 1), stage("joint", 2, terms=joint, data=Data.LABELED_AND_UNLABELED),
                         stage("joint", 2, terms=joint, data=Data.LABELED_AND_UNLABELED)])
    assert schedule.names == ["warmup", "joint"]
    assert schedule.span(0) == schedule.span(2) == (0, 5)  # one SGD and poly schedule over all epochs
    assert schedule.shares_optimizer(0, 2)


def test_optimizer_spans_split_where_optimizer_or_parameters_change():
    schedule = Schedule([stage("global", 1, Adam(1e-4), (ENCODER,)), stage("local", 2, Adam(1e-4)),
                         stage("finetune", 3)])
    assert [schedule.span(i) for i in range(3)] == [(0, 1), (1, 2), (3, 3)]
    assert not schedule.shares_optimizer(1, 2)


def test_replace_finetuning_keeps_the_pretraining_in_order():
    """Fine-tuning stages are those that train nnU-Net's segmentation loss; the others are pretraining."""
    contrast = (Term("global_contrast"),)
    finetune = Stage("finetune", 3, 2, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION),))
    stages = [stage("global", 1, Adam(1e-4), terms=contrast), finetune, stage("local", 2, Adam(1e-4), terms=contrast)]
    replacement = [stage("warmup", 1), stage("selftrain", 4)]
    assert [s.name for s in replace_finetuning(stages, replacement)] == ["global", "local", "warmup", "selftrain"]
    assert replace_finetuning(stages, []) == [stages[0], stages[2]]


def test_what_a_stage_is():
    assert stage("finetune", 1).is_nnunet_step and stage("finetune", 1).supervised
    weighted = stage("x", 1, terms=(Term(SEGMENTATION, 0.5),))
    assert not weighted.is_nnunet_step and weighted.supervised
    pretrain = stage("dense", 1, Adam(1e-3), terms=(Term("dense_contrast"),), data=Data.LABELED_AND_UNLABELED)
    assert not pretrain.is_nnunet_step and not pretrain.supervised
    with pytest.raises(ValueError, match="no stage has any epochs"):
        Schedule([stage("a", 0)])


def test_sigmoid_rampup_weight():
    ramp = Term("pseudo", sigmoid_rampup(0.5))
    assert ramp.weight_at(0.0) == pytest.approx(math.exp(-5))
    assert ramp.weight_at(0.25) == pytest.approx(math.exp(-5 * 0.25))
    assert ramp.weight_at(0.5) == ramp.weight_at(0.9) == 1.0
    values = [ramp.weight_at(p / 10) for p in range(10)]
    assert values == sorted(values)
    assert Term("x", sigmoid_rampup(0)).weight_at(0.0) == 1.0 and Term("x", 0.3).weight_at(0.7) == 0.3


def test_every_preset_value_fits_its_section():
    from nnunet_contrast.settings import all_preset_names, preset_settings

    for name, values in preset_settings(all_preset_names()).items():
        assert section_errors(name, values) == [], name
    assert set(preset_settings(["base"])) == {"budget", "semisup", "run", "selftraining"}
    assert set(SECTIONS) >= set(preset_settings(all_preset_names()))


class Checked(MethodTrainer):
    """A method with one head and one loss of its own, checked without building nnU-Net's trainer."""
    head_names = ("global",)

    def global_contrast_loss(self, inputs):
        raise AssertionError("not called by the check")


def check(*stages):
    trainer = Checked.__new__(Checked)
    trainer.schedule = Schedule(stages)
    trainer.check_schedule()


def test_a_misnamed_term_or_part_fails_when_the_trainer_is_built_in_one_line():
    pretrain = dict(optimizer=Adam(1e-4), terms=(Term("global_contrast"),))
    check(stage("global", 1, trains=(ENCODER, Head("global")), **pretrain), stage("finetune", 1))
    cases = [(stage("global", 1, trains=(ENCODER, Head("globl")), **pretrain), "no trainable part head globl"),
             (stage("global", 1, trains=(Part("decoder"),), **pretrain), "no trainable part decoder"),
             (stage("joint", 1, terms=(Term(SEGMENTATION), Term("global_contrst"))), "no loss method global_contrst_loss")]
    for wrong, message in cases:
        with pytest.raises(UserInputError) as error:
            check(stage("finetune", 1), wrong)
        assert f"Checked, stage '{wrong.name}': {message}" == str(error.value)
