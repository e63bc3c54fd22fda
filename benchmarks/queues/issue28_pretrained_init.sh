# Issue 28: Chaitanya et al. 2023's Table III "pretrained initialisation + proposed method": their pseudo-label
# contrast (PseudoLabelContrast, and its self-training variant) started from GlobalLocalContrast's pretraining
# (its checkpoint_pretrained.pth, nnU-Net's -pretrained_weights), beside the rows each one alone already recorded
# at 2 volumes, fold 0 (plans digest ff74c417, AVX512 kind). The benchmark trains the GlobalLocalContrast source
# once in bench/pretrained/nnUNetTrainerGlobalLocalContrast/, then each target from it. Run it in issue 26's work
# folder and records name, before the rest of issue 28's queue, e.g.
#   benchmarks/launch.sh /work/bench/scarce_fixed hippocampus_scarce_fixed_avx512 THIS_FILE \
#       benchmarks/queues/issue28_methods_and_label_curve.sh benchmarks/queues/issue29_3d_fullres.sh
D96="--set nnunet_contrast.selftraining.ema_decay=0.96"
TWO="--fractions 2 --no-upper-bound $D96"
for target in PseudoLabelContrast PseudoLabelContrastSelfTraining; do
    run "$target from GlobalLocalContrast's pretraining, fold 0" --folds 0 \
        --trainers nnUNetTrainer$target@nnUNetTrainerGlobalLocalContrast $TWO
done
# Table III's "PI. + proposed method" is the inter form of the contrast (Table I's inter row is its comparison)
run "PseudoLabelContrastInter from GlobalLocalContrast's pretraining, fold 0" --folds 0 \
    --trainers nnUNetTrainerPseudoLabelContrastInter@nnUNetTrainerGlobalLocalContrast $TWO
