"""``nnunet-contrast embed``: a t-SNE picture of a trained model's pixel embeddings, coloured by class.

As in the papers' embedding figures (Hu et al. 2021 Fig. 3, Chaitanya et al. 2023 Fig. 4): held-out
images are preprocessed by nnU-Net's own preprocessor, every 2D slice (a 3D model: the whole volume, so it
must fit the device's memory) goes through the trained network, and the output of one decoder stage
(default: the last, which the segmentation layer reads) is taken at up to ``pixels_per_class`` randomly
chosen pixels (voxels) of each class (upsampled to the image's resolution for a coarser stage). Features
are L2-normalised, as the contrastive losses compare them, before t-SNE. The silhouette score of the classes in the normalised feature space
(cosine distance) is printed beside the picture: a number for what the picture shows.
"""
import json
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_contrast.errors import UserInputError

MIN_PIXELS = 5  # per class; t-SNE needs more points than its perplexity


def pad_to_multiple(image: torch.Tensor, multiple: Sequence[int]) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
    """Zero-pad the spatial axes of ``image`` (N, C, *spatial), centred, up to multiples of ``multiple`` (one per
    axis); returns the padded image and the slices that crop an output of the same size back."""
    sides = image.shape[2:]
    pads = [(-side) % m for side, m in zip(sides, multiple)]
    padded = F.pad(image, [p for pad in reversed(pads) for p in (pad // 2, pad - pad // 2)])  # last axis first
    return padded, tuple(slice(pad // 2, pad // 2 + side) for pad, side in zip(pads, sides))


def sample_pixels(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> Dict[int, np.ndarray]:
    """Up to ``per_class`` flat indices of each class present in ``labels`` (any shape); negative
    labels (nnU-Net's ignore / outside-of-image marks) are never chosen."""
    flat = labels.reshape(-1)
    chosen = {}
    for value in np.unique(flat):
        if value < 0:
            continue
        where = np.flatnonzero(flat == value)
        chosen[int(value)] = rng.choice(where, size=min(per_class, where.size), replace=False)
    return chosen


def voxel_features(network: torch.nn.Module, data: torch.Tensor, stage: int, stride: Sequence[int]) -> torch.Tensor:
    """Normalised decoder-stage features of every voxel of a preprocessed volume (C, Z, H, W) -> (Z*H*W, F), in
    the volume's row-major order: slice by slice for a 2D network (``stride`` of 2 axes), the whole volume
    through a 3D one."""
    from nnunet_contrast.network.taps import forward_with_decoder_features

    batch = data.permute(1, 0, 2, 3) if len(stride) == 2 else data[None]  # slices, or the volume
    padded, crop = pad_to_multiple(batch, stride)
    mode = "bilinear" if len(stride) == 2 else "trilinear"
    maps = []
    for chunk in padded.split(16):  # a few slices at a time: whole volumes may not fit
        with torch.no_grad():
            _, features = forward_with_decoder_features(network, chunk.to(next(network.parameters()).device), stage)
        features = features.float().cpu()
        if features.shape[2:] != chunk.shape[2:]:
            features = F.interpolate(features, size=chunk.shape[2:], mode=mode, align_corners=False)
        maps.append(F.normalize(features[(slice(None), slice(None), *crop)], dim=1))
    maps = torch.cat(maps)
    return maps.movedim(1, -1).reshape(-1, maps.shape[1])


def collect_embeddings(network, volumes: List[Tuple[torch.Tensor, np.ndarray]], stage: int, stride: Sequence[int],
                       per_class: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(features N x F, class N) over all volumes, at most ``per_class`` pixels of each class in all."""
    rng = np.random.default_rng(seed)
    features, classes = [], []
    for data, seg in volumes:
        flat = voxel_features(network, data, stage, stride).numpy()
        for value, index in sample_pixels(seg[0], per_class, rng).items():
            features.append(flat[index])
            classes.append(np.full(index.size, value))
    if not features:
        raise UserInputError("no labelled pixels in the given images: pass label files with classes")
    features, classes = np.concatenate(features), np.concatenate(classes)
    keep = np.concatenate([rng.permutation(np.flatnonzero(classes == v))[:per_class] for v in np.unique(classes)])
    return features[keep], classes[keep]


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def silhouette(features: np.ndarray, classes: np.ndarray) -> float:
    """Silhouette of the classes under cosine distance; nan with fewer than two classes."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(classes)) < 2:
        return float("nan")
    return float(silhouette_score(features, classes, metric="cosine"))


def plot_embedding(points: np.ndarray, classes: np.ndarray, names: Dict[int, str], title: str, path: Path) -> None:
    from nnunet_contrast.plotting import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 6), dpi=100)
    for value in np.unique(classes):
        mask = classes == value
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.7, label=names.get(int(value), str(value)))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3)
    fig.tight_layout()
    save_figure(fig, path)


def image_label_pairs(images: Path, labels: Path, file_ending: str) -> List[Tuple[List[str], str]]:
    """nnU-Net's image naming (CASE_XXXX + ending) paired with label files CASE + ending."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder, \
        get_identifiers_from_splitted_dataset_folder

    if not Path(images).is_dir() or not Path(labels).is_dir():
        raise UserInputError(f"-i {images} and -l {labels} must be folders of images and of their labels")
    cases = get_identifiers_from_splitted_dataset_folder(str(images), file_ending)
    if len(cases) == 0:  # nnU-Net returns a numpy array
        raise UserInputError(f"no images in {images}: -i must hold CASE_0000{file_ending} files, as nnU-Net names them")
    pairs = [(files, str(Path(labels) / f"{case}{file_ending}"))
             for case, files in zip(cases, create_lists_from_splitted_dataset_folder(str(images), file_ending, cases))]
    missing = [label for _, label in pairs if not Path(label).is_file()]
    if missing:
        raise UserInputError(f"no label for {missing[0]}: -l must hold CASE{file_ending} for each "
                             f"CASE_0000{file_ending} in -i")
    return pairs


def load_predictor(model_folder: Path, fold: str, checkpoint: str, device: torch.device):
    """nnU-Net's predictor with the fold's weights (nnU-Net builds the trainer's own network)."""
    with warnings.catch_warnings():  # the trainer search imports modules with deprecation notices, not ours
        warnings.simplefilter("ignore", FutureWarning)
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda",
                                    verbose=False, allow_tqdm=False)  # nnU-Net warns about its default off CUDA
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                       checkpoint_name=checkpoint)
    return predictor


def embed(model_folder: Path, fold: str, checkpoint: str, images: Path, labels: Path, output: Path,
          stage: int = -1, per_class: int = 300, device: str = "cpu") -> float:
    """Draws the picture of ``model_folder``'s fold; returns the silhouette score."""
    from nnunet_contrast.network.taps import decoder_stage_count, total_stride

    if not (Path(model_folder) / f"fold_{fold}" / checkpoint).is_file():
        raise UserInputError(f"no {checkpoint} in {Path(model_folder) / f'fold_{fold}'}: train that fold first, or "
                             f"pass --chk checkpoint_best.pth / checkpoint_latest.pth")
    if per_class < MIN_PIXELS:
        raise UserInputError(f"--pixels {per_class} is too few for t-SNE: pass at least {MIN_PIXELS}")
    file_ending = json.loads((Path(model_folder) / "dataset.json").read_text())["file_ending"]
    pairs = image_label_pairs(images, labels, file_ending)  # before the model loads: bad folders fail fast
    predictor = load_predictor(model_folder, fold, checkpoint, torch.device(device))
    network = predictor.network.eval()
    stages = decoder_stage_count(network)
    if not -stages <= stage < stages:
        raise UserInputError(f"--stage {stage}: this network has {stages} decoder stages; pass -{stages} to "
                             f"{stages - 1} (-1 is the last, full-resolution one)")
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    volumes = []
    for files, label in pairs:
        data, seg, _ = preprocessor.run_case(files, label, predictor.plans_manager, predictor.configuration_manager,
                                             predictor.dataset_json)
        volumes.append((torch.from_numpy(np.asarray(data)).float(), np.asarray(seg)))
    dims = len(predictor.configuration_manager.patch_size)
    features, classes = collect_embeddings(network, volumes, stage, total_stride(network, dims), per_class)
    score = silhouette(features, classes)
    names = {int(v): k for k, v in predictor.dataset_json["labels"].items() if isinstance(v, int)}
    title = (f"{predictor.trainer_name}, fold {fold}, decoder stage {stage}: {len(volumes)} images, "
             f"silhouette {score:.3f}")
    plot_embedding(tsne(features), classes, names, title, output)
    return score
