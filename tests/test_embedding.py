"""The embedding picture's pieces on tensors: padding, pixel sampling, features, t-SNE, plot."""
from pathlib import Path

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from conftest import planned_network
from nnunet_contrast.commands.embed import collect_embeddings, image_label_pairs, pad_to_multiple, plot_embedding, \
    sample_pixels, silhouette, tsne, voxel_features
from nnunet_contrast.errors import UserInputError


def small_unet():
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv2d, 3, [1, 2, 2], 2, 3, [2, 2],
                         norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU).eval()


@pytest.mark.parametrize("shape, multiple", [((1, 2, 7, 9), (4, 4)), ((3, 1, 8, 8), (4, 2)), ((1, 1, 5, 3), (8, 1)),
                                             ((1, 1, 5, 7, 3), (4, 8, 2))])
def test_padding_to_a_multiple_is_undone_by_its_crop(shape, multiple):
    image = torch.randn(shape)
    padded, crop = pad_to_multiple(image, multiple)
    assert all(side % m == 0 for side, m in zip(padded.shape[2:], multiple))
    assert torch.equal(padded[(slice(None), slice(None), *crop)], image)


def test_pixel_sampling_balances_classes_and_skips_negative_labels():
    labels = np.zeros((2, 6, 6), dtype=np.int16)
    labels[0, 0, 0] = 2           # a single pixel of a class
    labels[1, :3] = 1
    labels[1, 5, 5] = -1          # nnU-Net's outside-of-image mark
    chosen = sample_pixels(labels, 10, np.random.default_rng(0))
    assert sorted(chosen) == [0, 1, 2]
    assert [len(chosen[c]) for c in (0, 1, 2)] == [10, 10, 1]
    flat = labels.reshape(-1)
    for value, index in chosen.items():
        assert (flat[index] == value).all() and len(set(index.tolist())) == len(index)


def test_voxel_features_of_a_2d_network_are_normalised_maps_of_each_slice():
    net = small_unet()
    volume = torch.randn(1, 3, 10, 13)                 # C, Z, H, W: odd sizes need padding
    maps = voxel_features(net, volume, -1, (4, 4))
    assert maps.shape == (3 * 10 * 13, 4)
    assert torch.allclose(maps.norm(dim=1), torch.ones(3 * 10 * 13), atol=1e-5)
    coarse = voxel_features(net, volume, 0, (4, 4))   # a coarser stage is brought to full size
    assert coarse.shape == (3 * 10 * 13, 8)
    single = voxel_features(net, volume[:, 1:2], -1, (4, 4))
    assert torch.allclose(single, maps[10 * 13:2 * 10 * 13], atol=1e-3)  # each slice on its own, in order


def test_voxel_features_of_a_3d_network_come_from_the_whole_volume():
    """nnU-Net's 3D U-Net: the volume padded to its total stride, one pass, the last decoder stage cropped back."""
    from nnunet_contrast.network.taps import forward_with_decoder_features, total_stride

    net = planned_network("PlainConvUNet", "3d_fullres").eval()
    stride = total_stride(net, 3)
    volume = torch.randn(1, 9, 13, 11)
    features = voxel_features(net, volume, -1, stride)
    padded, crop = pad_to_multiple(volume[None], stride)
    assert padded.shape[2:] == tuple(-(-side // s) * s for side, s in zip((9, 13, 11), stride))
    with torch.no_grad():
        _, direct = forward_with_decoder_features(net, padded)
    expected = torch.nn.functional.normalize(direct[(0, slice(None), *crop)], dim=0)       # F, Z, H, W
    assert features.shape == (9 * 13 * 11, expected.shape[0])
    torch.testing.assert_close(features[(4 * 13 + 5) * 11 + 6], expected[:, 4, 5, 6])     # voxel (4, 5, 6)


def test_embeddings_hold_at_most_the_asked_pixels_of_each_class():
    net = small_unet()
    seg = np.zeros((1, 2, 8, 8), dtype=np.int16)
    seg[0, 0, 2:6, 2:6] = 1
    seg[0, 1, 0, 0] = 2
    volumes = [(torch.randn(1, 2, 8, 8), seg), (torch.randn(1, 2, 8, 8), seg)]
    features, classes = collect_embeddings(net, volumes, -1, (4, 4), per_class=20)
    assert features.shape == (20 + 20 + 2, 4)
    assert [int((classes == c).sum()) for c in (0, 1, 2)] == [20, 20, 2]
    points = tsne(features)
    assert points.shape == (42, 2) and np.isfinite(points).all()


def test_silhouette_separates_clusters_and_is_nan_for_one_class():
    a = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5) + 0.01 * np.random.default_rng(0).standard_normal((10, 2))
    classes = np.array([0] * 5 + [1] * 5)
    assert silhouette(a, classes) > 0.9
    assert np.isnan(silhouette(a, np.zeros(10)))


def test_no_labelled_pixels_is_a_clear_error():
    with pytest.raises(UserInputError, match="no labelled pixels"):
        collect_embeddings(small_unet(), [], -1, (4, 4), 10)


def test_plot_writes_a_png(tmp_path):
    points = np.random.default_rng(0).standard_normal((12, 2))
    plot_embedding(points, np.array([0, 1, 2] * 4), {0: "background", 1: "a"}, "title", tmp_path / "e" / "x.png")
    assert (tmp_path / "e" / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_images_are_paired_with_their_labels_by_nnunet_naming(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    for folder in (images, labels):
        folder.mkdir()
    with pytest.raises(UserInputError, match="no images in"):
        image_label_pairs(images, labels, ".nii.gz")
    for case in ("case_a", "case_b"):
        (images / f"{case}_0000.nii.gz").write_bytes(b"")
    (labels / "case_a.nii.gz").write_bytes(b"")
    with pytest.raises(UserInputError, match="no label for .*case_b.nii.gz"):
        image_label_pairs(images, labels, ".nii.gz")
    (labels / "case_b.nii.gz").write_bytes(b"")
    pairs = image_label_pairs(images, labels, ".nii.gz")
    assert [(len(files), Path(label).name) for files, label in pairs] == [(1, "case_a.nii.gz"), (1, "case_b.nii.gz")]
