"""Network pieces on nnU-Net's planned U-Nets: feature taps, projection heads, the second
(bilinear) decoder and the sub-patch grid."""
