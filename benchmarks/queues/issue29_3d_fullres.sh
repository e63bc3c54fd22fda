# Issue 29, item 5: Hippocampus 3d_fullres at 2 labelled volumes, folds 0-2, on one processor kind: LabeledOnly,
# SelfTraining, CopyPaste and the upper bound (LabeledOnly on all labels), all on benchmark_cpu's 3d_fullres block
# (batch 2, nnU-Net's 3D patch, 5 x 250 iterations; about 35 minutes for LabeledOnly and the upper bound, 75 for
# SelfTraining and CopyPaste on 2 AVX512 cores). In issue 26's work folder and records name on the AVX512 kind, so
# that the report puts the 3D rows beside the 2D rows of the same folds, e.g.
#   benchmarks/queue.sh VENV /work/bench/scarce_fixed REPO hippocampus_scarce_fixed_avx512 THIS_FILE
# from a clone with the 3d_fullres block (this file's commit or later). One call per trainer, so that each
# record is committed as soon as its run ends; the first call of a fold trains its LabeledOnly too.
THREE="--configuration 3d_fullres --fractions 2"
for fold in 0 1 2; do
    run "3d_fullres fold $fold: LabeledOnly and SelfTraining" --folds $fold --trainers $ST $THREE --no-upper-bound
    run "3d_fullres fold $fold: CopyPaste"                    --folds $fold --trainers $CP $THREE --no-upper-bound
    run "3d_fullres fold $fold: upper bound"                  --folds $fold --trainers $LO $THREE
done
