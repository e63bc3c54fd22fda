# Issue 27, the rest of issue27_weak_teacher_settings.sh (which ran the gate and BCP's warm-up on 2026-12-06):
# the other settings on the weak-teacher proxy, and a harder proxy candidate. Same proxy, same budget; run with
# benchmarks/queue.sh from a clone at d9fb77e or later, on the AVX512 kind to pair with those records (on
# another kind, run issue27_weak_teacher_proxy.sh's 2-volume pair again first).
WEAK="--set nnunet_contrast.budget.num_epochs=25 --set nnunet_contrast.budget.num_iterations_per_epoch=50 \
      --set nnunet_contrast.selftraining.warmup_fraction=0.04"
run "weak-teacher proxy, self-adaptive threshold (momentum 0.99): SelfTraining fold 0" --fractions 2 --folds 0 \
    --trainers $ST --no-upper-bound $WEAK --set nnunet_contrast.selftraining.threshold=self_adaptive \
    --set nnunet_contrast.selftraining.threshold_momentum=0.99
run "weak-teacher proxy, reliable images first (share 0.25 rising over half the stage): SelfTraining fold 0" \
    --fractions 2 --folds 0 --trainers $ST --no-upper-bound $WEAK --set nnunet_contrast.selftraining.reliable_start=0.25
# a harder proxy candidate: 1 labelled volume with the 50-iteration warm-up (the student itself weaker)
run "weak-teacher proxy, 1 volume, 50-iteration warm-up: SelfTraining fold 0" --fractions 1 --folds 0 \
    --trainers $ST --no-upper-bound $WEAK
