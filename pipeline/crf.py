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
the exact dense CRF (up to the positional kernel's taps under 1e-4 of its centre, left out).

`crf_logits` is the same mean field for logits that are already on that grid: the model's
own output grid (1/8 of the input for most models here; see `models.GridHead`), which the
pipeline refines before it resizes anything to pixels. It returns the model's logits plus the
last message, and the caller resizes them to pixels as the model resizes its own: the labels
are those of `dense_crf` over the resized probabilities on 99% of pixels (tested on CamVid),
and no pass over C classes at full resolution is left in the CRF.

Defaults (`downsample=8`, `window=7`): each iteration sums 49 neighbours on an 8x coarser grid,
reaching 24 px in every direction for the bilateral term. On CamVid frames and on 512x512
images with 21 classes, the argmax agrees with pydensecrf's on about 96.5% of pixels (97% for
`downsample=4, window=11`, at 3 to 4 times the cost), in about 15 ms for a 480x360 frame with
21 classes on 2 CPU cores (bench/ reports the figures).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .numerics import floored_exp_

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
    _check_settings(window, downsample, iterations)

    probs = probs.float()
    if iterations == 0:
        return probs.clone()
    # Mean-field runs on the coarse grid: Q and its unary are the probabilities averaged over
    # each cell. Only the last update is made at full resolution, from the full-resolution
    # probabilities, so the model's own boundaries survive while the messages (smooth at the
    # scale of the kernels) are upsampled. Full-resolution passes over C classes dominated the
    # cost when every iteration made them (about 80% of the time on CPU).
    q = _cell_means(probs, downsample)
    colours = _colour_means(images, downsample, tuple(q.shape[-2:]))
    message = _last_message(q, q.clamp_min(eps).log(), colours, iterations=iterations,
                            downsample=downsample, window=window, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                            bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std)
    # softmax(log P + m) = P * exp(m) / sum: no full-resolution log, and exp on the coarse grid
    factor = floored_exp_(message - message.amax(dim=1, keepdim=True))
    if downsample > 1:
        # channels_last: PyTorch's vectorised bilinear kernel on CPU, about 3x the NCHW one
        factor = F.interpolate(factor.contiguous(memory_format=torch.channels_last),
                               size=(factor.shape[-2] * downsample, factor.shape[-1] * downsample),
                               mode="bilinear", align_corners=False)[..., :height, :width]
    q = factor.mul_(probs)
    # all-zero probabilities stay zero rather than becoming NaN
    return q.div_(q.sum(dim=1, keepdim=True).clamp_min_(1e-30))


def _check_settings(window: int | None, downsample: int, iterations: int) -> None:
    """The mean field's settings, as both `dense_crf` and `crf_logits` take them."""
    if window is not None and (window < 1 or window % 2 == 0):
        raise ValueError(f"window must be a positive odd number or None, got {window}")
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")


def crf_logits(
    logits: torch.Tensor,
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
) -> torch.Tensor:
    """`dense_crf` for logits that are already on its coarse grid: (B, C, h, w) logits of the
    cells of `downsample` x `downsample` pixels of uint8 RGB images (B, 3, H, W), counted from
    their top-left corner (h = ceil(H / downsample), or one more: the images padded by
    repeating their edge). Returns refined logits on the same grid, (B, C, h, w) float32: the model's logits
    plus the last mean-field message.

    They are the model's output grid at 1/8 (`models.GridHead`): mean field runs on the
    probabilities of the cells themselves, and the last update is made there too; the caller
    resizes the refined logits to pixels as the model resizes its own. Resizing is linear, so
    the pixels get their resized logits plus the resized message, as `dense_crf` gives them
    (which multiplies by the resized exp of the message instead), without any
    full-resolution pass over the classes here.
    """
    _check_settings(window, downsample, iterations)
    b, _, h, w = logits.shape
    if images.ndim != 4 or images.shape[:2] != (b, 3) or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (B, 3, H, W) with B = {b}, got {images.dtype} {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if not (0 <= h * downsample - height < 2 * downsample and 0 <= w * downsample - width < 2 * downsample):
        raise ValueError(f"logits of {h}x{w} cells do not cover images of {(height, width)} in cells of {downsample}")
    logits = logits.float()
    if iterations == 0:
        return logits.clone()
    unary = torch.log_softmax(logits, dim=1)
    # a cell beyond the image's last (the model's grid padded further) takes the edge's colours
    colours = _colour_means(images, downsample, (h, w))
    message = _last_message(floored_exp_(unary.clone()), unary, colours, iterations=iterations,
                            downsample=downsample, window=window, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                            bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std)
    return message.add_(logits)


def _cell_means(x: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, C, H, W) averaged over cells of `cell` x `cell` pixels from the top-left corner,
    the last row and column of cells padded by repeating the edge: a tile of a larger image
    that starts on a cell boundary then has the larger image's cells, so tiles refined apart
    join without seams."""
    if cell == 1:
        return x
    height, width = x.shape[-2:]
    pad = (0, -width % cell, 0, -height % cell)
    return F.avg_pool2d(F.pad(x, pad, mode="replicate") if any(pad) else x, cell)


def _colour_means(images: torch.Tensor, cell: int, cells: tuple[int, int]) -> torch.Tensor:
    """`_cell_means` of uint8 images (B, 3, H, W) as float32 (B, 3, *cells): each cell's mean
    colour, the image's last row and column repeated for the cells, or parts of them, past
    its end. Summed in integers, without a full-resolution copy: the cells' first rows, then
    their second ones, and so on, each a strided view of whole image rows (int16 while `cell`
    x 255 fits), then the columns of those row sums. Converting the pixels to float,
    padding and pooling them took 43 to 46 ms for a 2304 x 2304 CRF span (a raster block
    and its margin: a third of its CRF); this takes 3 to 4. Images laid out as decoded, (H, W, 3)
    permuted to (3, H, W), are summed in that layout."""
    b, c, height, width = images.shape
    decoded = images.permute(0, 2, 3, 1)
    # (N, H, W, K): the decoded layout as it is, or each channel a plane of its own
    pixels = decoded if decoded.is_contiguous() else images.contiguous().view(b * c, height, width, 1)
    rows, cols = cells
    dtype = torch.int16 if cell * 255 <= torch.iinfo(torch.int16).max else torch.int32
    row_sums = torch.zeros(pixels.shape[0], rows, width, pixels.shape[-1], dtype=dtype, device=images.device)
    for row in range(cell):
        inside = min(rows, max(0, -(-(height - row) // cell)))  # the cells whose row `row` is the image's
        row_sums[:, :inside] += pixels[:, row::cell][:, :inside]
        if inside < rows:
            row_sums[:, inside:] += pixels[:, height - 1 : height]
    if cols * cell != width:  # the row sums (a cell-th of the pixels) cut or extended to whole cells
        at = torch.arange(cols * cell, device=images.device).clamp_max_(width - 1)
        row_sums = row_sums.index_select(2, at)
    means = row_sums.view(*row_sums.shape[:2], cols, cell, row_sums.shape[-1]).sum(dim=3, dtype=torch.float32)
    means = means.div_(cell * cell)
    if pixels is decoded:
        return means.permute(0, 3, 1, 2).contiguous()
    return means.view(b, c, rows, cols)


def _last_message(q: torch.Tensor, unary: torch.Tensor, image: torch.Tensor, *, iterations: int, downsample: int,
                  window: int | None, pos_w: float, pos_xy_std: float, bi_w: float, bi_xy_std: float,
                  bi_rgb_std: float) -> torch.Tensor:
    """Mean field on the coarse grid from probabilities `q` (their logs `unary`) and the
    cells' mean colours `image`; returns the message of the last iteration (B, C, h, w)."""
    grid = tuple(q.shape[-2:])
    radius_y = grid[0] - 1 if window is None else min(window // 2, grid[0] - 1)
    radius_x = grid[1] - 1 if window is None else min(window // 2, grid[1] - 1)
    positional = _SeparableGaussian(pos_xy_std / downsample, radius_y, radius_x, grid, q.device)
    bilateral = _Bilateral(image, bi_xy_std / downsample, bi_rgb_std, radius_y, radius_x)
    for iteration in range(iterations):
        message = pos_w * positional(q) + bi_w * bilateral(q)
        if iteration < iterations - 1:
            q = torch.softmax(unary + message, dim=1)
    return message


class _SeparableGaussian:
    """D^-1/2 K D^-1/2 for a position-only Gaussian truncated to a square window: separable."""

    def __init__(self, std: float, radius_y: int, radius_x: int, grid: tuple[int, int], device: torch.device) -> None:
        def taps(radius: int) -> list[float]:
            # plain numbers: the blur's shifted sums take them as scalars, with no device sync
            return [math.exp(-(d * d) / (2 * std**2)) for d in range(-radius, radius + 1)]

        # taps below 1e-4 of the centre's are left out: at the default 8-pixel cells the
        # kernel's std is 3/8 of a cell, so only the nearest neighbours count (the next tap
        # is 6e-7)
        reach = math.floor(std * math.sqrt(2 * math.log(1e4)))
        radius_y, radius_x = min(radius_y, reach), min(radius_x, reach)
        self.kernel_y = taps(radius_y)
        self.kernel_x = taps(radius_x)
        self.radius_y, self.radius_x = radius_y, radius_x
        # near the borders fewer neighbours exist, so D varies: computed, not assumed
        norm = self._blur(torch.ones(1, 1, *grid, device=device))
        self.norm = norm.rsqrt()

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        # shifted sums rather than a 1-channel convolution: oneDNN ran that at 10 ms a call on
        # a 288x288 grid of 7 classes, 40% of the whole CRF (profiled); these take a few ms
        return _shifted_sum(_shifted_sum(x, self.kernel_x, self.radius_x, dim=-1), self.kernel_y, self.radius_y, dim=-2)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.norm * self._blur(self.norm * q)


class _Bilateral:
    """D^-1/2 K D^-1/2 for the bilateral kernel, as a sum over the window's offsets.

    The kernel weight of every (cell, offset) pair is computed once per call of `dense_crf`
    and reused by every iteration. The grid is walked flat, row after row: an offset is one
    shift along it, and a neighbour that shift finds past a row's end (or off the grid) has
    weight zero, so nothing is padded, unfolded or cut out in two dimensions.
    """

    def __init__(self, image: torch.Tensor, xy_std: float, rgb_std: float, radius_y: int, radius_x: int) -> None:
        b, _, h, w = image.shape
        device = image.device
        offsets = [(dy, dx) for dy in range(-radius_y, radius_y + 1) for dx in range(-radius_x, radius_x + 1)]
        cells = h * w
        pixels = image.reshape(b, image.shape[1], cells)
        # one shift at a time: unfolding every neighbour at once took 20 of the 44 ms these
        # weights took on a raster block's grid (288 x 288 cells: 49 copies of its colours)
        colour = torch.zeros(b, len(offsets), cells, device=device)
        spans = [_span(dy * w + dx, cells) for dy, dx in offsets]
        for k, (start, end, shift) in enumerate(spans):
            colour[:, k, start:end] = torch.sub(pixels[:, :, start + shift : end + shift], pixels[:, :, start:end]).square_().sum(dim=1)
        dy = torch.tensor([o[0] for o in offsets], device=device)
        dx = torch.tensor([o[1] for o in offsets], device=device)
        rows = torch.arange(h, device=device)[None] + dy[:, None]
        cols = torch.arange(w, device=device)[None] + dx[:, None]
        on_grid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        spatial = (dy * dy + dx * dx).float().div_(2 * xy_std**2).view(1, -1, 1)
        weights = floored_exp_(colour.div_(-2 * rgb_std**2).sub_(spatial)).mul_(on_grid.view(1, -1, cells))
        self.norm = weights.sum(dim=1, keepdim=True).rsqrt()
        centre = offsets.index((0, 0))
        self.centre = weights[:, centre : centre + 1]
        # each shift's weights cut to its span once, here, not at every iteration
        self.shifts = [(start, end, shift, weights[:, k : k + 1, start:end])
                       for k, (start, end, shift) in enumerate(spans) if k != centre]

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        b, c, h, w = q.shape
        q = self.norm * q.reshape(b, c, h * w)
        total = self.centre * q
        for start, end, shift, weights in self.shifts:
            total[:, :, start:end].addcmul_(weights, q[:, :, start + shift : end + shift])
        return (self.norm * total).view(b, c, h, w)


def _span(shift: int, length: int) -> tuple[int, int, int]:
    """[start, end) of the positions along a flat grid of `length` cells whose position plus
    `shift` is on it, and the shift."""
    return max(0, -shift), length - max(0, shift), shift


def _shifted_sum(x: torch.Tensor, taps: list[float], radius: int, *, dim: int) -> torch.Tensor:
    """sum_k taps[k] * x shifted by k - radius along `dim`, zero beyond the edges: a 1-D
    correlation, as F.conv2d with zero padding computes it."""
    length = x.shape[dim]
    total = x * taps[radius]
    for k, tap in enumerate(taps):
        offset = k - radius
        if offset == 0 or abs(offset) >= length:
            continue
        # out[i] += tap * x[i + offset] where i + offset is inside
        if offset > 0:
            total.narrow(dim, 0, length - offset).add_(x.narrow(dim, offset, length - offset), alpha=tap)
        else:
            total.narrow(dim, -offset, length + offset).add_(x.narrow(dim, 0, length + offset), alpha=tap)
    return total
