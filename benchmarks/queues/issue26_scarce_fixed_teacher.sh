# Issue 26's re-measurement with the fixed EMA teacher: 2 labelled Hippocampus volumes, folds 0-2, one
# processor kind (records: docs/benchmark/hippocampus_scarce_fixed_avx512, from a clone at c3401bd).
# Run with benchmarks/queue.sh.
run "LabeledOnly fold 0"        --folds 0 --trainers $LO --fractions 2 --no-upper-bound
run "SelfTraining fold 0"       --folds 0 --trainers $ST --fractions 2 --no-upper-bound
# the default decay, chosen on fold 0: a faster teacher (its own plans digest, with its own LabeledOnly)
run "SelfTraining fold 0, ema_decay 0.96" --folds 0 --trainers $ST --fractions 2 --no-upper-bound \
    --set nnunet_contrast.selftraining.ema_decay=0.96
# with the fixed update 0.96 beat 0.99 on fold 0 (0.8160 against 0.7868) and became the default (commit after
# c3401bd): the rest runs at 0.96, in the plans of that digest, each fold with its own LabeledOnly there
D96="--set nnunet_contrast.selftraining.ema_decay=0.96"
run "CopyPaste fold 0, ema_decay 0.96" --folds 0 --trainers $CP --fractions 2 --no-upper-bound $D96
for fold in 1 2; do
    run "SelfTraining fold $fold, ema_decay 0.96" --folds $fold --trainers $ST --fractions 2 --no-upper-bound $D96
    run "CopyPaste fold $fold, ema_decay 0.96"    --folds $fold --trainers $CP --fractions 2 --no-upper-bound $D96
done
run "upper bound fold 2"        --fractions 2 --folds 2 --trainers $LO
run "LabeledOnly and upper bound folds 0-1" --fractions 2 --folds 0 1 --trainers $LO
