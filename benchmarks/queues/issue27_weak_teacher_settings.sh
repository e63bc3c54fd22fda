# Issue 27: each setting for a weak first teacher on the proxy (2 labelled volumes, fold 0, seed 0,
# benchmark_cpu as 25 epochs x 50 iterations, a warm-up of 50 iterations after which the network's pseudo
# Dice is 0 / 0), each beside its own LabeledOnly (the benchmark pairs every plans digest with one).
# Run with benchmarks/queue.sh from a clone at a commit that has the settings (d9fb77e or later).
WEAK="--set nnunet_contrast.budget.num_epochs=25 --set nnunet_contrast.budget.num_iterations_per_epoch=50 \
      --set nnunet_contrast.selftraining.warmup_fraction=0.04"
run "weak-teacher proxy, teacher gate (labelled-batch Dice 0.7): SelfTraining fold 0" --fractions 2 --folds 0 \
    --trainers $ST --no-upper-bound $WEAK --set nnunet_contrast.selftraining.teacher_min_dice=0.7
run "weak-teacher proxy, BCP copy-paste warm-up: SelfTraining fold 0" --fractions 2 --folds 0 --trainers $ST \
    --no-upper-bound $WEAK --set nnunet_contrast.selftraining.warmup_mixing=copypaste
run "weak-teacher proxy, self-adaptive threshold (momentum 0.99): SelfTraining fold 0" --fractions 2 --folds 0 \
    --trainers $ST --no-upper-bound $WEAK --set nnunet_contrast.selftraining.threshold=self_adaptive \
    --set nnunet_contrast.selftraining.threshold_momentum=0.99
run "weak-teacher proxy, reliable images first (share 0.25 rising over half the stage): SelfTraining fold 0" \
    --fractions 2 --folds 0 --trainers $ST --no-upper-bound $WEAK --set nnunet_contrast.selftraining.reliable_start=0.25
# a harder proxy candidate: 1 labelled volume with the 50-iteration warm-up (the student itself weaker)
run "weak-teacher proxy, 1 volume, 50-iteration warm-up: SelfTraining fold 0" --fractions 1 --folds 0 \
    --trainers $ST --no-upper-bound $WEAK
