"""Semi-supervised data: which training cases keep their labels, extra unlabelled images, and
batches that carry images only."""
