"""Fully connected CRF (Krähenbühl & Koltun, 2011) as batched tensor operations.

Mean-field with Potts compatibility and symmetric kernel normalisation, as pydensecrf does by
default:

    Q0 = P
    Q  <- softmax(log P + sum_m w_m * D_m^-1/2 K_m D_m^-1/2 Q),   D_m = K_m 1

K_1 is a Gaussian on positions (std `pos_xy_std`, weight `pos_w`); K_2 a bilateral kernel on
positions (`bi_xy_std`) and RGB (`bi_rgb_std`), weight `bi_w`. Both include each pixel's own
term.

Instead of a permutohedral lattice, messages are exact sums over a square `window` of
neighbours on a grid `downsample` times coarser than the image. The mean-field iterations run
on that grid, on the probabilities averaged over each cell; the last update is made at full
resolution from the full-resolution probabilities and the upsampled messages, so the model's
own boundaries survive while the messages (smooth at the kernels' scale) cost a coarse
grid's work. Everything is plain tensor arithmetic that runs wherever the tensors are (CPU or
CUDA), batched. With `downsample=1` and a window covering the image (`window=None`), this is
the exact dense CRF.

Defaults (`downsample=8`, `window=7`): each iteration sums 49 neighbours on an 8x coarser grid,
reaching 24 px in every direction for the bilateral term. On CamVid frames and on 512x512
images with 21 classes, the argmax agrees with pydensecrf's on about 96.5% of pixels (97% for
`downsample=4, window=11`, at 3 to 4 times the cost), in about 15 ms for a 480x360 frame with
21 classes on 2 CPU cores (bench/ reports the figures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_WINDOW = 7
DEFAULT_DOWNSAMPLE = 8


def dense_crf(
    probs: torch.Tensor,
    images: torch.Tensor,
    *,
    iterations: int = 5,
    pos_w: float = 3.0,
    pos_xy_std: float = 3.0,
    bi_w: float = 4.0,
    bi_xy_std: float = 67.0,
    bi_rgb_std: float = 3.0,
    window: int | None = DEFAULT_WINDOW,
    downsample: int = DEFAULT_DOWNSAMPLE,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Refine probabilities (B, C, H, W) with uint8 RGB images (B, 3, H, W); returns float32
    probabilities of the same shape on the same device.

    `window`: odd side of the square neighbourhood on the downsampled grid (None: the whole
    image, i.e. the exact dense CRF). `downsample`: grid coarseness for the messages (1: full
    resolution).
    """
    if probs.ndim != 4 or images.ndim != 4:
        raise ValueError(f"probs must be (B, C, H, W) and images (B, 3, H, W); got {tuple(probs.shape)} and {tuple(images.shape)}")
    b, _, height, width = probs.shape
    if tuple(images.shape) != (b, 3, height, width):
        raise ValueError(f"images must be (B, 3, H, W) = {(b, 3, height, width)}, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 RGB, got {images.dtype}")
    if images.device != probs.device:
        raise ValueError(f"probs are on {probs.device} but images on {images.device}")
    if window is not None and (window < 1 or window % 2 == 0):
        raise ValueError(f"window must be a positive odd number or None, got {window}")
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")

    probs = probs.float()
    if iterations == 0:
        return probs.clone()
    coarse = downsample > 1
    # Mean-field runs on the coarse grid: Q and its unary are the probabilities averaged over
    # each cell. Only the last update is made at full resolution, from the full-resolution
    # probabilities, so the model's own boundaries survive while the messages (smooth at the
    # scale of the kernels) are upsampled. Full-resolution passes over C classes dominated the
    # cost when every iteration made them (about 80% of the time on CPU).
    # Cells are `downsample` pixels from the image's top-left corner, the last row and column
    # of cells padded by repeating the edge: a tile of a larger image that starts on a cell
    # boundary then has the larger image's cells, so tiles refined apart join without seams.
    pad = (0, -width % downsample, 0, -height % downsample)
    padded = F.pad(probs, pad, mode="replicate") if any(pad) else probs
    grid = (padded.shape[-2] // downsample, padded.shape[-1] // downsample)
    q = F.avg_pool2d(padded, downsample) if coarse else probs
    unary = q.clamp_min(eps).log()
    pixels = images.float()
    image = F.avg_pool2d(F.pad(pixels, pad, mode="replicate") if any(pad) else pixels, downsample) if coarse else pixels
    radius_y = grid[0] - 1 if window is None else min(window // 2, grid[0] - 1)
    radius_x = grid[1] - 1 if window is None else min(window // 2, grid[1] - 1)

    positional = _SeparableGaussian(pos_xy_std / downsample, radius_y, radius_x, grid, probs.device)
    bilateral = _Bilateral(image, bi_xy_std / downsample, bi_rgb_std, radius_y, radius_x)

    for iteration in range(iterations):
        message = pos_w * positional(q) + bi_w * bilateral(q)
        if iteration < iterations - 1:
            q = torch.softmax(unary + message, dim=1)
    # softmax(log P + m) = P * exp(m) / sum: no full-resolution log, and exp on the coarse grid
    factor = (message - message.amax(dim=1, keepdim=True)).exp_()
    if coarse:
        # channels_last: PyTorch's vectorised bilinear kernel on CPU, about 3x the NCHW one
        factor = F.interpolate(factor.contiguous(memory_format=torch.channels_last), size=tuple(padded.shape[-2:]),
                               mode="bilinear", align_corners=False)[..., :height, :width]
    q = factor.mul_(probs)
    # all-zero probabilities stay zero rather than becoming NaN
    return q.div_(q.sum(dim=1, keepdim=True).clamp_min_(1e-30))


class _SeparableGaussian:
    """D^-1/2 K D^-1/2 for a position-only Gaussian truncated to a square window: separable."""

    def __init__(self, std: float, radius_y: int, radius_x: int, grid: tuple[int, int], device: torch.device) -> None:
        def taps(radius: int) -> torch.Tensor:
            d = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
            return torch.exp(-(d**2) / (2 * std**2))

        self.kernel_y = taps(radius_y).view(1, 1, -1, 1)
        self.kernel_x = taps(radius_x).view(1, 1, 1, -1)
        self.radius_y, self.radius_x = radius_y, radius_x
        # near the borders fewer neighbours exist, so D varies: computed, not assumed
        norm = self._blur(torch.ones(1, 1, *grid, device=device))
        self.norm = norm.rsqrt()

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = x.reshape(b * c, 1, h, w)
        y = F.conv2d(y, self.kernel_x, padding=(0, self.radius_x))
        y = F.conv2d(y, self.kernel_y, padding=(self.radius_y, 0))
        return y.reshape(b, c, h, w)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.norm * self._blur(self.norm * q)


class _Bilateral:
    """D^-1/2 K D^-1/2 for the bilateral kernel, as a sum over the window's offsets.

    The kernel weight of every (pixel, offset) pair is computed once per call of `dense_crf`
    and reused by every iteration.
    """

    def __init__(self, image: torch.Tensor, xy_std: float, rgb_std: float, radius_y: int, radius_x: int) -> None:
        b, _, h, w = image.shape
        self.radius_y, self.radius_x = radius_y, radius_x
        self.shape = (h, w)
        padded = F.pad(image, (radius_x, radius_x, radius_y, radius_y))
        inside = F.pad(torch.ones(1, 1, h, w, device=image.device), (radius_x, radius_x, radius_y, radius_y))
        self.offsets = [(dy, dx) for dy in range(-radius_y, radius_y + 1) for dx in range(-radius_x, radius_x + 1)]
        weights = torch.empty(b, len(self.offsets), h, w, device=image.device)
        for k, (dy, dx) in enumerate(self.offsets):
            neighbour = self._shift(padded, dy, dx)
            colour = ((image - neighbour) ** 2).sum(dim=1)
            spatial = (dy * dy + dx * dx) / (2 * xy_std**2)
            weights[:, k] = torch.exp(-spatial - colour / (2 * rgb_std**2)) * self._shift(inside, dy, dx)[:, 0]
        self.weights = weights
        self.norm = weights.sum(dim=1, keepdim=True).rsqrt()

    def _shift(self, padded: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        h, w = self.shape
        y0, x0 = self.radius_y + dy, self.radius_x + dx
        return padded[:, :, y0 : y0 + h, x0 : x0 + w]

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        padded = F.pad(self.norm * q, (self.radius_x, self.radius_x, self.radius_y, self.radius_y))
        total = torch.zeros_like(q)
        for k, (dy, dx) in enumerate(self.offsets):
            total.addcmul_(self.weights[:, k : k + 1], self._shift(padded, dy, dx))
        return self.norm * total
