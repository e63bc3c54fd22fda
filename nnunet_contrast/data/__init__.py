"""Semi-supervised data: which training cases keep their labels, extra unlabelled images, batches
that carry images only, two-view augmentation and pixel selection."""
