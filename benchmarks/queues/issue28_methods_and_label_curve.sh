# Issue 28: what the contrastive methods add, alone and under self-training, and the label curve.
# All at the plans digest of issue 26's 2-volume runs (ff74c417: benchmark_cpu with the default decay 0.96
# named; without it, SelfTraining would land in f9c7e9fe, where a run at the old default 0.99 is recorded),
# so that each run pairs with the SelfTraining already recorded there on the same fold and kind; LabeledOnly,
# the upper bound and the recipe train in the shared baseline plans (f9c7e9fe, recorded for folds 0-2). Run with benchmarks/queue.sh in issue 26's work folder and records name, e.g.
#   benchmarks/queue.sh VENV /work/bench/scarce_fixed REPO hippocampus_scarce_fixed_avx512 THIS_FILE
# from a clone at the commit that shares the baseline or later (and so has the Inter self-training variant
# and the "supervised" curve), on the
# AVX512 kind. On another kind: a new work folder and records name (e.g. hippocampus_scarce_fixed_epyc); the
# benchmark then runs that kind's LabeledOnly first, and SelfTraining is the first line below.
D96="--set nnunet_contrast.selftraining.ema_decay=0.96"
TWO="--fractions 2 --no-upper-bound $D96"
run "SelfTraining fold 0 (skipped where recorded)" --folds 0 --trainers $ST $TWO
# 1. every method as published and its self-training variant, 2 volumes, fold 0
for method in SupConLocal PseudoLabelContrast PseudoLabelContrastInter GlobalLocalContrast GlobalContrast \
              CrossLevel IDEAL; do
    run "$method fold 0"              --folds 0 --trainers nnUNetTrainer$method $TWO
    run "${method}SelfTraining fold 0" --folds 0 --trainers nnUNetTrainer${method}SelfTraining $TWO
done
# 2. folds 1 and 2 for each variant that beats SelfTraining on fold 0, or the two best: after the first 12
# runs (04eec61) SupConLocalSelfTraining (+0.0006) and GlobalContrastSelfTraining (+0.0005); replace them if
# CrossLevel's or IDEAL's variant does better on fold 0
for variant in SupConLocalSelfTraining GlobalContrastSelfTraining; do
    run "$variant folds 1-2" --folds 1 2 --trainers nnUNetTrainer$variant $TWO
done
# 3. the upper bound of each fold in these plans (LabeledOnly on all labels), then the label curve
for fold in 0 1 2; do
    run "upper bound fold $fold" --folds $fold --trainers $LO --fractions 2 $D96
done
for volumes in 5 10; do
    for fold in 0 1 2; do
        run "LabeledOnly, SelfTraining, CopyPaste at $volumes volumes, fold $fold" --folds $fold \
            --trainers $ST $CP --fractions $volumes --no-upper-bound $D96
    done
done
run "the maintainers' recipe, 2 volumes, fold 2" --folds 2 --trainers $LO --recipe $TWO
