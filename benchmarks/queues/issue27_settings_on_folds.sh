# Issue 27, item 3 on the 2-volume Hippocampus folds: each setting for a weak first teacher at the normal
# budget (benchmark_cpu, the 250-iteration warm-up), fold 0 of every setting first, then folds 1 and 2.
# In issue 26's work folder and records name (AVX512 kind), e.g.
#   benchmarks/queue.sh VENV /work/bench/scarce_fixed REPO hippocampus_scarce_fixed_avx512 THIS_FILE
# from a clone that shares the baseline (87f5181 or later): every run then pairs with the LabeledOnly and the
# upper bound recorded there (plans f9c7e9fe) and with today's SelfTraining (ff74c417), and only the
# SelfTraining of each setting trains (~16 minutes each). On another kind: a new work folder and records
# name; LabeledOnly then trains once per fold there, and the defaults first (the first line).
D96="--set nnunet_contrast.selftraining.ema_decay=0.96"
TWO="--fractions 2 --no-upper-bound $D96"
GATE="--set nnunet_contrast.selftraining.teacher_min_dice=0.7"
BCP="--set nnunet_contrast.selftraining.warmup_mixing=copypaste"
ADAPTIVE="--set nnunet_contrast.selftraining.threshold=self_adaptive --set nnunet_contrast.selftraining.threshold_momentum=0.99"
RELIABLE="--set nnunet_contrast.selftraining.reliable_start=0.25"
# The settings that change training first, fold by fold; the self-adaptive threshold after them (it collapsed on
# fold 0: 0.4994); the gate last: on fold 0 it opened at the first step (teacher Dice 0.76 >= 0.7) and repeated
# the defaults to every digit.
for fold in 0 1 2; do
    run "SelfTraining fold $fold, defaults (skipped where recorded)" --folds $fold --trainers $ST $TWO
    run "SelfTraining fold $fold, BCP copy-paste warm-up"     --folds $fold --trainers $ST $TWO $BCP
    run "SelfTraining fold $fold, reliable images first"      --folds $fold --trainers $ST $TWO $RELIABLE
done
for fold in 0 1 2; do
    run "SelfTraining fold $fold, self-adaptive threshold"     --folds $fold --trainers $ST $TWO $ADAPTIVE
done
for fold in 0 1 2; do
    run "SelfTraining fold $fold, teacher gate 0.7"           --folds $fold --trainers $ST $TWO $GATE
done
