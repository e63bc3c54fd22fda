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
