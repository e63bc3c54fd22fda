# Issue 27's development proxy for a weak first teacher, on Hippocampus (fold 0, seed 0, benchmark_cpu):
# does the symptom of the held-out cardiac dataset appear (confident share near 100 %, a foreground class
# near Dice 0 after the warm-up, no gain over LabeledOnly)? Two candidates, each with its own LabeledOnly:
# 1 labelled volume; 2 labelled volumes with a warm-up of 50 iterations (the same 1,250 iterations, as
# 25 epochs of 50). Run with benchmarks/queue.sh from a clone that logs the teacher per class.
run "weak-teacher proxy, 1 labelled volume: LabeledOnly fold 0"   --fractions 1 --folds 0 --trainers $LO --no-upper-bound
run "weak-teacher proxy, 1 labelled volume: SelfTraining fold 0"  --fractions 1 --folds 0 --trainers $ST --no-upper-bound
SHORT="--set nnunet_contrast.budget.num_epochs=25 --set nnunet_contrast.budget.num_iterations_per_epoch=50"
run "weak-teacher proxy, 2 volumes, 25 x 50 iterations: LabeledOnly fold 0" --fractions 2 --folds 0 --trainers $LO \
    --no-upper-bound $SHORT
run "weak-teacher proxy, 2 volumes, 50-iteration warm-up: SelfTraining fold 0" --fractions 2 --folds 0 --trainers $ST \
    --no-upper-bound $SHORT --set nnunet_contrast.selftraining.warmup_fraction=0.04
