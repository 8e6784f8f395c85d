"""Train-time augmentation of whole batches on their device, with per-sample randomness drawn up front.

``Augmentation.sample(n, generator)`` draws the random parameters of ``n`` samples at once (a dict of
tensors whose first dimension is the sample); ``augmentation(images, params)`` applies them to a batch
[N, C, H, W] of normalized images, ``params`` indexed to that batch. The trainer draws the parameters of
a whole epoch from a generator seeded by (seed, epoch) and indexes them by dataset index, so the
augmentation of a sample depends on neither the number of processes nor where a resumed run
restarted: both see exactly what an uninterrupted single-process run sees.

Why not torchvision: there is no CPU build of torchvision for this torch, its AutoAugment works one
image at a time in the data loader, and batched tensor ops on the training device are cheaper for
32x32 images. The ops follow torchvision's definitions (``AutoAugmentPolicy.CIFAR10``, magnitudes on
10 bins, nearest interpolation, black fill, uint8 rounding after every op).

Kinds (``AUGMENTATIONS``): "none"; "crop_flip" (zero-pad 4, random 32x32 crop, horizontal flip with
probability 1/2); "crop_flip_autoaugment_cutout" (then the AutoAugment CIFAR-10 policy and Cutout of
one 16x16 square, the CIFAR-100 recipe of ResNet-18 and VGG7 in docs/models.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop_flip", "crop_flip_autoaugment_cutout")

CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
"""AutoAugment's CIFAR-10 policy: 25 sub-policies of two (op, probability, magnitude bin) steps."""

NUM_BINS = 10
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _magnitudes(op: str, size: int) -> tuple[torch.Tensor, bool]:
    """torchvision's magnitude of each bin for ``op`` on ``size``-pixel images, and whether it is signed."""
    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, NUM_BINS), True
    if op in ("TranslateX", "TranslateY"):
        return torch.linspace(0.0, 150.0 / 331.0 * size, NUM_BINS).trunc(), True  # whole pixels
    if op == "Rotate":
        return torch.linspace(0.0, 30.0, NUM_BINS), True
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, NUM_BINS), True
    if op == "Posterize":
        return (8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4)).round()), False
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, NUM_BINS) / 255.0, False
    return torch.zeros(NUM_BINS), False


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """Rounds [0, 1] images to the 256 levels of uint8, as torchvision's uint8 pipeline does after each op."""
    return (images.clamp(0, 1) * 255).round() / 255


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1) * images + (1 - factor.view(-1, 1, 1, 1)) * other


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _sample_grid(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling with black fill: output pixel centre p reads input at ``inverse @ [p, 1]``
    (``inverse`` [K, 2, 3], pixel coordinates)."""
    k, _, height, width = images.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=images.device, dtype=images.dtype),
                            torch.arange(width, device=images.device, dtype=images.dtype), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)  # [1, H*W, 3]
    source = points @ inverse.transpose(1, 2)  # [K, H*W, 2]
    grid = torch.stack([(2 * source[..., 0] + 1) / width - 1, (2 * source[..., 1] + 1) / height - 1], -1)
    return F.grid_sample(images, grid.view(k, height, width, 2), mode="nearest", padding_mode="zeros",
                         align_corners=False)


def _affine(images: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
            tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    inverse = torch.stack([torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1)], 1)
    return _sample_grid(images, inverse)


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotation about the image centre (torchvision's: counter-clockwise for positive degrees)."""
    _, _, height, width = images.shape
    angle = torch.deg2rad(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return _affine(images, cos, -sin, sin, cos, cx - cos * cx + sin * cy, cy - sin * cx - cos * cy)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's sharpness: blend with a 3x3 smoothing (centre weight 5 of 13) of the interior; borders kept."""
    kernel = images.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
    smooth = F.conv2d(images, kernel.expand(images.shape[1], 1, 3, 3), groups=images.shape[1])
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = _quantize(smooth)
    return _blend(images, degenerate, factor)


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, torch.ones_like(high), 1 / (high - low).clamp_min(1e-12))
    return torch.where(flat, images, (images - low) * scale)


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's per-channel histogram equalization of the uint8 levels (torchvision's ``F.equalize``)."""
    k, channels, height, width = images.shape
    levels = (images * 255).round().long().view(k * channels, -1)  # [K*C, H*W]
    histogram = torch.zeros(k * channels, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, levels, torch.ones_like(levels))
    last_level = torch.where(histogram > 0, torch.arange(256, device=images.device), -1).amax(1, keepdim=True)
    step = (height * width - histogram.gather(1, last_level)) // 255  # [K*C, 1]
    safe_step = step.clamp_min(1)
    lut = (histogram.cumsum(1) + safe_step // 2) // safe_step
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    equalized = lut.gather(1, levels)
    out = torch.where(step == 0, levels, equalized)  # one level only: unchanged
    return (out.to(images.dtype) / 255).view(k, channels, height, width)


def _apply_op(op: str, images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``op`` on [0, 1] images [K, C, H, W], one magnitude per image (``magnitude`` [K])."""
    zero, one = torch.zeros_like(magnitude), torch.ones_like(magnitude)
    if op == "ShearX":
        return _affine(images, one, magnitude, zero, one, zero, zero)
    if op == "ShearY":
        return _affine(images, one, zero, magnitude, one, zero, zero)
    if op == "TranslateX":  # content moves by +magnitude pixels
        return _affine(images, one, zero, zero, one, -magnitude, zero)
    if op == "TranslateY":
        return _affine(images, one, zero, zero, one, zero, -magnitude)
    if op == "Rotate":
        return _rotate(images, magnitude)
    if op == "Brightness":
        return _blend(images, torch.zeros_like(images), 1 + magnitude)
    if op == "Color":
        return _blend(images, _grayscale(images), 1 + magnitude)
    if op == "Contrast":
        return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), 1 + magnitude)
    if op == "Sharpness":
        return _sharpness(images, 1 + magnitude)
    if op == "Posterize":
        keep = (2 ** (8 - magnitude)).view(-1, 1, 1, 1)  # drop the low 8 - bits bits
        return torch.div((images * 255).round(), keep, rounding_mode="floor") * keep / 255
    if op == "Solarize":
        return torch.where(images >= magnitude.view(-1, 1, 1, 1), 1 - images, images)
    if op == "AutoContrast":
        return _autocontrast(images)
    if op == "Equalize":
        return _equalize(images)
    if op == "Invert":
        return 1 - images
    raise ValueError(f"unknown AutoAugment op {op!r}")


class Augmentation:
    """A train-time augmentation; see the module docstring. ``mean``/``std`` ([C]) are those the images
    were normalized with: the ops work on [0, 1] pixels, as in the reference pipelines."""

    def __init__(self, kind: str, mean, std, *, image_size: int = 32, padding: int = 4,
                 cutout_size: int = 16) -> None:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {kind!r}")
        self.kind = kind
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_size = image_size
        self.padding = padding
        self.cutout_size = cutout_size
        # The policy as [25, 2] tables (sub-policy, step), so an image's step is a gather of its row.
        self.op_names = sorted({op for sub_policy in CIFAR10_POLICY for op, _, _ in sub_policy})
        steps = [step for sub_policy in CIFAR10_POLICY for step in sub_policy]
        tables = [(self.op_names.index(op), probability, *self._magnitude(op, bin_index, image_size))
                  for op, probability, bin_index in steps]
        op_index, probability, magnitude, signed = (torch.tensor(column).view(len(CIFAR10_POLICY), 2)
                                                    for column in zip(*tables))
        self.policy_tables = {"op": op_index, "probability": probability.float(), "magnitude": magnitude.float(),
                              "signed": signed}

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The random parameters of ``n`` samples, each tensor [n, ...]; always drawn in the same order."""
        if self.kind == "none":
            return {}
        params = {"offsets": torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator),
                  "flips": torch.rand(n, generator=generator) < 0.5}
        if self.kind == "crop_flip_autoaugment_cutout":
            params["policy"] = torch.randint(len(CIFAR10_POLICY), (n,), generator=generator)
            params["draws"] = torch.rand(n, 2, generator=generator)
            params["signs"] = torch.randint(2, (n, 2), generator=generator)
            params["cutout"] = torch.randint(self.image_size, (n, 2), generator=generator)
        return params

    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "none":
            return images
        device = images.device
        params = {name: value.to(device) for name, value in params.items()}
        mean, std = self.mean.to(device), self.std.to(device)
        pixels = _crop_flip(images * std + mean, params["offsets"], params["flips"], self.padding)
        if self.kind == "crop_flip":
            return (pixels - mean) / std
        pixels = self._autoaugment(_quantize(pixels), params)
        return _cutout((pixels - mean) / std, params["cutout"], self.cutout_size)

    @staticmethod
    def _magnitude(op: str, bin_index: int | None, image_size: int) -> tuple[float, bool]:
        magnitudes, signed = _magnitudes(op, image_size)
        return (float(magnitudes[bin_index]) if bin_index is not None else 0.0), signed

    def _autoaugment(self, pixels: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each image runs its sub-policy's two steps in order; a step applies when its draw <= its
        probability. Per step, the images doing the same op are transformed together."""
        tables = {name: table.to(pixels.device) for name, table in self.policy_tables.items()}
        policy = params["policy"]
        for step in range(2):
            op = tables["op"][policy, step]
            applies = params["draws"][:, step] <= tables["probability"][policy, step]
            magnitude = tables["magnitude"][policy, step].to(pixels.dtype)
            negative = tables["signed"][policy, step] & (params["signs"][:, step] == 0)
            magnitude = torch.where(negative, -magnitude, magnitude)
            for index, name in enumerate(self.op_names):
                rows = (applies & (op == index)).nonzero().flatten()
                if rows.numel():
                    pixels[rows] = _quantize(_apply_op(name, pixels[rows], magnitude[rows]))
        return pixels


def _crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image: a crop of the input's size from the zero-padded image at ``offsets`` [N, 2] (row, col),
    mirrored horizontally where ``flips`` [N]."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(height, device=images.device)  # [N, H]
    cols = offsets[:, 1, None] + torch.arange(width, device=images.device)  # [N, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _cutout(images: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Zeroes (the mean colour, after normalization) a ``size`` square per image centred at ``centres``
    [N, 2] (row, col), clipped at the borders, as DeVries & Taylor's Cutout does."""
    _, _, height, width = images.shape
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    top, left = centres[:, 0].view(-1, 1, 1) - size // 2, centres[:, 1].view(-1, 1, 1) - size // 2
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(inside[:, None], 0.0)


def recipe_augmentation(dataset: str, model: str) -> str:
    """The augmentation kind of the docs/models.md recipe: CIFAR-100 ResNet-18/VGG add AutoAugment + Cutout to
    crop + flip, MSDNet uses crop + flip; digits and synthetic are not augmented (a flip changes a digit)."""
    if dataset != "cifar100":
        return "none"
    return "crop_flip" if model.startswith("msdnet") else "crop_flip_autoaugment_cutout"


__all__ = ["AUGMENTATIONS", "Augmentation", "CIFAR10_POLICY", "recipe_augmentation"]
