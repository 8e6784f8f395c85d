"""Batched train-time augmentation: crop/flip, the AutoAugment CIFAR-10 ops and policy, Cutout."""

import numpy as np
import pytest
import torch

from dfs_kernels.training.augment import (
    CIFAR10_POLICY,
    Augmentation,
    _apply_op,
    _crop_flip,
    _cutout,
    recipe_augmentation,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _pixels(n=4, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator).float() / 255


def _normalized(pixels):
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_crop_flip_is_a_crop_of_the_black_padded_image():
    pixels = _pixels(6, 32)
    augmentation = Augmentation("crop_flip", MEAN, STD)
    params = augmentation.sample(6, torch.Generator().manual_seed(3))
    out = augmentation(_normalized(pixels), params)
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4))
    for n in range(6):
        row, col = params["offsets"][n].tolist()
        crop = padded[n, :, row:row + 32, col:col + 32]
        expected = _normalized((crop.flip(-1) if params["flips"][n] else crop)[None])[0]
        torch.testing.assert_close(out[n], expected)
    assert Augmentation("none", MEAN, STD)(pixels, {}) is pixels


def test_sampling_is_deterministic_and_covers_every_sample():
    augmentation = Augmentation("crop_flip_autoaugment_cutout", MEAN, STD)
    first = augmentation.sample(50, torch.Generator().manual_seed(1))
    again = augmentation.sample(50, torch.Generator().manual_seed(1))
    assert first.keys() == again.keys() == {"offsets", "flips", "policy", "draws", "signs", "cutout"}
    assert all(torch.equal(first[key], again[key]) and first[key].shape[0] == 50 for key in first)
    assert int(first["policy"].max()) < len(CIFAR10_POLICY)


def test_geometric_ops_move_pixels_as_defined():
    x = _pixels(2, 6)
    translated = _apply_op("TranslateX", x, torch.tensor([2.0, -1.0]))
    assert torch.equal(translated[0, ..., 2:], x[0, ..., :-2]) and translated[0, ..., :2].abs().max() == 0
    assert torch.equal(translated[1, ..., :-1], x[1, ..., 1:])
    down = _apply_op("TranslateY", x, torch.tensor([1.0, 1.0]))
    assert torch.equal(down[:, :, 1:], x[:, :, :-1])
    rotated = _apply_op("Rotate", x, torch.tensor([90.0, -90.0]))
    assert torch.equal(rotated[0], torch.rot90(x[0], 1, (1, 2)))  # counter-clockwise
    assert torch.equal(rotated[1], torch.rot90(x[1], -1, (1, 2)))
    sheared = _apply_op("ShearX", x, torch.tensor([1.0, 1.0]))  # row y reads columns shifted by y
    for y in range(6):
        assert torch.equal(sheared[:, :, y, :6 - y], x[:, :, y, y:])


def test_colour_ops_match_their_formulas():
    x = _pixels(3, 5)
    ones = torch.ones(3)
    assert torch.equal(_apply_op("Invert", x, ones), 1 - x)
    threshold = torch.tensor([0.5, 0.0, 1.1])
    solarized = _apply_op("Solarize", x, threshold)
    assert torch.equal(solarized[0], torch.where(x[0] >= 0.5, 1 - x[0], x[0]))
    assert torch.equal(solarized[1], 1 - x[1]) and torch.equal(solarized[2], x[2])
    posterized = _apply_op("Posterize", x, torch.tensor([4.0, 8.0, 1.0]))
    levels = (x * 255).round().long()
    for n, bits in enumerate((4, 8, 1)):
        expected = (levels[n] & (0xFF ^ ((1 << (8 - bits)) - 1))).float() / 255
        torch.testing.assert_close(posterized[n], expected)
    torch.testing.assert_close(_apply_op("Brightness", x, torch.tensor([-0.5, 0.0, 0.3]))[0], 0.5 * x[0])
    gray = (x * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(_apply_op("Color", x, -ones), gray.expand_as(x))
    torch.testing.assert_close(_apply_op("Contrast", x, -ones), gray.mean((1, 2, 3), keepdim=True).expand_as(x))
    stretched = _apply_op("AutoContrast", x * 0.5 + 0.2, ones)
    torch.testing.assert_close(stretched.amin((2, 3)), torch.zeros(3, 3))
    torch.testing.assert_close(stretched.amax((2, 3)), torch.ones(3, 3))
    sharpened = _apply_op("Sharpness", x, torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(sharpened[..., 0, :], x[..., 0, :])  # borders are not smoothed
    torch.testing.assert_close(sharpened[..., :, -1], x[..., :, -1])


def _pil_equalize(channel: np.ndarray) -> np.ndarray:
    """PIL's ImageOps.equalize on one uint8 channel, written from its definition."""
    histogram = np.bincount(channel.ravel(), minlength=256)
    nonzero = histogram[histogram > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
        return channel
    lut, total = [], step // 2
    for count in histogram:
        lut.append(min(255, total // step))
        total += count
    return np.asarray(lut, dtype=np.int64)[channel]


def test_equalize_matches_pil_definition():
    x = _pixels(3, 9, seed=5) ** 2  # skewed histogram
    x[2] = 0.4  # a single level: unchanged
    out = _apply_op("Equalize", (x * 255).round() / 255, torch.ones(3))
    levels = (x * 255).round().long().numpy()
    for n in range(3):
        for c in range(3):
            expected = _pil_equalize(levels[n, c]) / 255
            np.testing.assert_allclose(out[n, c].numpy(), expected, atol=1e-6)


def test_autoaugment_batch_equals_each_image_on_its_own():
    augmentation = Augmentation("crop_flip_autoaugment_cutout", MEAN, STD, image_size=32)
    images = _normalized(_pixels(40, 32, seed=2))
    params = augmentation.sample(40, torch.Generator().manual_seed(4))
    params["draws"][:20] = 0.0  # force every step of half the images to apply
    batch = augmentation(images, params)
    for n in range(40):
        single = augmentation(images[n:n + 1], {key: value[n:n + 1] for key, value in params.items()})
        torch.testing.assert_close(batch[n:n + 1], single, rtol=0, atol=1e-6)
    assert batch.shape == images.shape and batch.isfinite().all()


def test_autoaugment_applies_the_chosen_sub_policy():
    augmentation = Augmentation("crop_flip_autoaugment_cutout", MEAN, STD, image_size=8)
    pixels = _pixels(1, 8)
    invert_then_contrast = 0  # (("Invert", 0.1, None), ("Contrast", 0.2, 6))
    params = {"policy": torch.tensor([invert_then_contrast]), "draws": torch.tensor([[0.05, 0.9]]),
              "signs": torch.tensor([[1, 1]])}
    torch.testing.assert_close(augmentation._autoaugment(pixels.clone(), params), 1 - pixels)
    params["draws"] = torch.tensor([[0.5, 0.9]])  # neither step passes its probability
    torch.testing.assert_close(augmentation._autoaugment(pixels.clone(), params), pixels)


def test_cutout_zeroes_a_clipped_square():
    images = torch.ones(2, 3, 32, 32)
    out = _cutout(images, torch.tensor([[16, 16], [0, 31]]), 16)
    assert int((out[0, 0] == 0).sum()) == 256 and out[0, :, 8:24, 8:24].abs().max() == 0
    assert int((out[1, 0] == 0).sum()) == 8 * 9 and out[1, :, :8, 23:].abs().max() == 0  # rows 0-7, cols 23-31


def test_crop_flip_helper_pads_with_zeros():
    images = torch.ones(1, 1, 4, 4)
    out = _crop_flip(images, torch.tensor([[0, 0]]), torch.tensor([False]), 2)
    assert out[0, 0, :2].abs().max() == 0 and out[0, 0, 2:, 2:].min() == 1


def test_recipe_and_bad_kind():
    assert recipe_augmentation("cifar100", "resnet18") == "crop_flip_autoaugment_cutout"
    assert recipe_augmentation("cifar100", "vgg7") == "crop_flip_autoaugment_cutout"
    assert recipe_augmentation("cifar100", "msdnet") == "crop_flip"
    assert recipe_augmentation("digits", "vgg7") == "none"
    with pytest.raises(ValueError, match="augmentation must be one of"):
        Augmentation("mixup", MEAN, STD)
