"""Optical flow for the motion reward: a weight-free pyramidal Lucas–Kanade and torchvision's RAFT.

Every backend maps two batches of frames `(N, 3, H, W)` in [0, 1] to the flow `(N, 2, H, W)` in pixels
(channel 0 = x, 1 = y) such that `frame2(p + flow(p)) ≈ frame1(p)`: `warp(frame2, flow)` brings the
second frame back onto the first, which is what the warp error of `rewards.motion` compares.

- `lucas_kanade_flow`: coarse-to-fine Lucas–Kanade (Bouguet, "Pyramidal implementation of the
  Lucas Kanade feature tracker", 2001), dense and batched: on each pyramid level, solve the 2x2
  normal equations of the brightness-constancy residual in a local window, warp, repeat. Good on
  textured content and smooth synthetic patterns; no weights, so the scorer can be tested anywhere.
- `RaftFlow`: RAFT (Teed & Deng, ECCV 2020) from torchvision, the model VBench's dynamic degree uses.
  Weights are the user's local copy of torchvision's `Raft_Small_Weights` / `Raft_Large_Weights`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards.analytic import luma
from rewards.base import require_file
from rlhf.errors import UserError, one_line

# torchvision's published RAFT weights (a user downloads one and passes its path).
RAFT_WEIGHT_URLS = {
    "raft_small": "https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth (Raft_Small_Weights.C_T_V2)",
    "raft_large": "https://download.pytorch.org/models/raft_large_C_T_V1-22a6c225.pth (Raft_Large_Weights.C_T_V1, "
                  "the port of the paper's weights that VBench uses)",
}


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample `image (N, C, H, W)` at `p + flow(p)`: bilinear, border pixels repeat outside the frame.

    Repeating the border (rather than masking out-of-frame samples) keeps the warp error honest: a
    flow that points everything outside the frame does not get to skip the comparison.
    """
    _, _, height, width = image.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=image.device, dtype=image.dtype),
                            torch.arange(width, device=image.device, dtype=image.dtype), indexing="ij")
    x = xs + flow[:, 0]  # (N, H, W)
    y = ys + flow[:, 1]
    # grid_sample wants coordinates in [-1, 1] with align_corners=True: -1 = first pixel centre.
    grid = torch.stack((2 * x / max(width - 1, 1) - 1, 2 * y / max(height - 1, 1) - 1), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def to_gray(frames: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H, W)` RGB -> `(N, 1, H, W)` luma: flow is estimated on grey images."""
    return luma(frames).unsqueeze(1)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `(N, 1, H, W)` with reflected borders."""
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    pad = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)
    if pad < radius:  # a tiny level: reflect padding cannot exceed the image size
        kernel, radius = kernel[radius - pad: radius + pad + 1], pad
        kernel = kernel / kernel.sum()
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(image, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def _gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central-difference x and y derivatives of `(N, 1, H, W)` (replicated borders)."""
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    grad_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    grad_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return grad_x, grad_y


def _box(image: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a `window x window` box around each pixel (only over pixels inside the frame) of every channel.

    Separable: a box's part inside the frame is a rectangle, so its sum is a row-window sum of column-window sums
    and its pixel count the product of the two windows' counts. Each 1-D window sum is a difference of two
    running sums of the zero-padded line, a constant cost per pixel whatever the window (a convolution with a
    kernel of ones costs `window`, avg_pool2d `window`^2): on the world's 64 px frames 20x faster than the
    convolutions, where Lucas-Kanade spent most of the `motion` reward's time.
    """
    height, width = image.shape[-2:]

    def window_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
        # sum of x[i - window // 2 .. i + window // 2] along `dim`: running[i + window] - running[i] after
        # padding window // 2 + 1 zeros before (the first running sum is then 0) and window // 2 after.
        before, after = window // 2 + 1, window // 2
        running = F.pad(x, (before, after) if dim == -1 else (0, 0, before, after)).cumsum(dim)
        size = x.shape[dim]
        return running.narrow(dim, window, size) - running.narrow(dim, 0, size)

    sums = window_sums(window_sums(image, -1), -2)
    counts = window_sums(window_sums(image.new_ones(1, 1, height, width), -1), -2)
    return sums / counts


def lucas_kanade_flow(frame1: torch.Tensor, frame2: torch.Tensor, *, window: int = 15, iterations: int = 4,
                      min_level_size: int = 16, max_levels: int = 6, eps: float = 1e-2) -> torch.Tensor:
    """Dense coarse-to-fine Lucas–Kanade flow from `frame1` to `frame2` (both `(N, 3, H, W)` in [0, 1]).

    Pyramid levels halve the size down to `min_level_size` (at most `max_levels`); coarsest first,
    each level starts from the upsampled flow of the level below and runs `iterations` damped
    Gauss–Newton steps (see the loop). A `window x window` box shares one displacement, as in
    Lucas–Kanade; `eps` (relative to the mean gradient energy) damps each step so flat or
    one-directional regions (the aperture problem) keep their previous estimate instead of dividing
    by zero. Returns `(N, 2, H, W)` in pixels. Not differentiable by design (the motion reward is not).
    """
    gray1, gray2 = to_gray(frame1.float()), to_gray(frame2.float())
    # Gaussian pre-smoothing makes the finite-difference gradients (and the linearisation) reliable.
    gray1, gray2 = _gaussian_blur(gray1, 1.0), _gaussian_blur(gray2, 1.0)
    levels = 1
    while levels < max_levels and min(gray1.shape[-2:]) // 2 ** levels >= min_level_size:
        levels += 1
    pyramid = [(gray1, gray2)]
    for _ in range(levels - 1):
        # Blur then halve: a small anti-aliasing step per level.
        prev1, prev2 = (_gaussian_blur(g, 1.0) for g in pyramid[-1])
        pyramid.append((F.avg_pool2d(prev1, 2, ceil_mode=True), F.avg_pool2d(prev2, 2, ceil_mode=True)))

    flow = None
    for level1, level2 in reversed(pyramid):  # coarse to fine
        size = level1.shape[-2:]
        if flow is None:
            flow = level1.new_zeros(level1.shape[0], 2, *size)
        else:
            # Upsample the coarser flow and scale its vectors to this level's pixel size.
            scale = torch.tensor([size[1] / flow.shape[-1], size[0] / flow.shape[-2]], device=flow.device)
            flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False) * scale.view(1, 2, 1, 1)
        grad_x, grad_y = _gradients(level1)
        energy = _box(grad_x * grad_x + grad_y * grad_y, window)
        # Levenberg damping relative to each image's gradient energy: scale-free; where the window
        # is flat or one-dimensional (aperture problem) the flow stays at its previous estimate.
        damp = eps * energy.mean(dim=(1, 2, 3), keepdim=True) + 1e-12
        for _ in range(iterations):
            # Each pixel q gives one linear constraint g_q . u = g_q . u_q - r_q on the flow u, the
            # brightness-constancy residual r_q = frame2(q + u_q) - frame1(q) linearised around its
            # own flow u_q. A window shares one u (Lucas-Kanade's assumption): solve the damped
            # least squares (A + damp I) u = sum_q g_q c_q + damp u_p, A = sum_q g_q g_q^T.
            # Pixels whose flow leaves the frame carry no information and do not vote.
            inside = _inside(flow)
            residual = warp(level2, flow) - level1
            target = grad_x * flow[:, :1] + grad_y * flow[:, 1:] - residual  # c_q, (N, 1, h, w)
            gx, gy = grad_x * inside, grad_y * inside
            sums = _box(torch.cat((gx * grad_x, gx * grad_y, gy * grad_y, gx * target, gy * target), dim=1), window)
            a_xx, a_xy, a_yy, rhs_x, rhs_y = sums.split(1, dim=1)
            a_xx, a_yy = a_xx + damp, a_yy + damp
            rhs_x, rhs_y = rhs_x + damp * flow[:, :1], rhs_y + damp * flow[:, 1:]
            det = a_xx * a_yy - a_xy * a_xy
            solved = torch.cat(((a_yy * rhs_x - a_xy * rhs_y) / det, (a_xx * rhs_y - a_xy * rhs_x) / det), dim=1)
            # At most one pixel per iteration: the linearisation holds only for small steps, larger
            # motion is the coarser levels' job.
            flow = flow + (solved - flow).clamp(-1, 1)
    return flow


def _inside(flow: torch.Tensor) -> torch.Tensor:
    """`(N, 1, H, W)` mask of the pixels whose flow target `p + flow(p)` lies inside the frame."""
    height, width = flow.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height, device=flow.device, dtype=flow.dtype),
                            torch.arange(width, device=flow.device, dtype=flow.dtype), indexing="ij")
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    return ((x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)).unsqueeze(1).to(flow.dtype)


class RaftFlow(nn.Module):
    """torchvision RAFT (`raft_small` / `raft_large`) loaded from a local state-dict file, frozen.

    RAFT needs H and W divisible by 8 and at least 128 (its correlation pyramid downsamples the
    1/8-resolution features four more times), so frames are resized to the nearest valid size and
    the flow is resized back and rescaled to the input's pixel units.
    """

    def __init__(self, arch: str, weights: str | Path, num_flow_updates: int = 12):
        super().__init__()
        from torchvision.models import optical_flow

        if arch not in RAFT_WEIGHT_URLS:
            raise UserError(f"backend: unknown RAFT variant {arch!r}; expected one of {', '.join(RAFT_WEIGHT_URLS)}")
        path = require_file(weights, "raft_weights", f"{arch} weights",
                            f"download {RAFT_WEIGHT_URLS[arch]} and pass its local path")
        self.model = getattr(optical_flow, arch)(weights=None, progress=False)
        try:
            self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # a wrong file: not a pickle, not a state dict, other keys or shapes
            raise UserError(f"raft_weights: {path} is not a torchvision {arch} state dict ({one_line(err)})") from None
        self.model.eval().requires_grad_(False)
        self.arch, self.num_flow_updates = arch, num_flow_updates

    def forward(self, frame1: torch.Tensor, frame2: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` in [0, 1] twice -> flow `(N, 2, H, W)` in pixels of the input."""
        height, width = frame1.shape[-2:]
        size = [max(128, 8 * round(height / 8)), max(128, 8 * round(width / 8))]
        pair = torch.cat((frame1, frame2)).float()  # (2N, 3, H, W)
        if size != [height, width]:
            pair = F.interpolate(pair, size=size, mode="bilinear", align_corners=False)
        image1, image2 = (pair * 2 - 1).chunk(2)  # RAFT expects [-1, 1]
        flow = self.model(image1.contiguous(), image2.contiguous(), num_flow_updates=self.num_flow_updates)[-1]
        if size != [height, width]:
            flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([width / size[1], height / size[0]], device=flow.device).view(1, 2, 1, 1)
        return flow
