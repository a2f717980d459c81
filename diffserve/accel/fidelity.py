"""How far a lossy output is from the lossless one: PSNR and SSIM of uint8 images or videos (pure functions).

Inputs are uint8 arrays of one shape: an image (H, W, 3) or (H, W), or a video (F, H, W, 3), or any stack of
those with more leading axes. PSNR is over every value at once (peak 255). SSIM is Wang et al. (2004) on
the luminance (ITU-R BT.601 weights 0.299, 0.587, 0.114) with an 11x11 Gaussian window of sigma 1.5,
K1 = 0.01, K2 = 0.03, L = 255, population statistics, over the positions where the window fits whole (no
padding), averaged per frame and then over frames; the same figures as scikit-image's
`structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)`
on the luminance.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PEAK = 255.0
K1, K2 = 0.01, 0.03
SIGMA = 1.5
WINDOW = 11  # 2 * round(3.5 * sigma) + 1, the window scikit-image uses for sigma 1.5
LUMA = (0.299, 0.587, 0.114)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"fidelity: shapes differ: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"fidelity: expected uint8 images, got {a.dtype} and {b.dtype}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of one shape: 10 log10(255^2 / MSE); inf when
    they are identical."""
    a, b = _pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK**2 / mse)


def luminance(x: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB -> (..., H, W) float64 luma (BT.601); a (..., H, W) array is taken as luma."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim >= 3 and x.shape[-1] == 3:
        return x @ np.asarray(LUMA)
    return x


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian; the 2-D window is its outer product."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> Gaussian-weighted means over every whole window: (N, 1, H-10, W-10)."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-position SSIM of two luminance planes stacked as (N, H, W) float64 -> (N, H-10, W-10)."""
    if a.shape[-1] < WINDOW or a.shape[-2] < WINDOW:
        raise ValueError(f"ssim: images must be at least {WINDOW}x{WINDOW}, got {a.shape[-2]}x{a.shape[-1]}")
    g = gaussian_window()
    x, y = (torch.from_numpy(np.ascontiguousarray(v)).reshape(-1, 1, *v.shape[-2:]) for v in (a, b))
    mx, my = _filter(x, g), _filter(y, g)
    vx = _filter(x * x, g) - mx * mx
    vy = _filter(y * y, g) - my * my
    cxy = _filter(x * y, g) - mx * my
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s[:, 0].numpy()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 images (H, W, 3) / (H, W) or videos (F, H, W, 3), on the luminance; 1.0 when
    they are identical. Frames are scored one by one and averaged."""
    a, b = _pair(a, b)
    ya, yb = luminance(a), luminance(b)
    frames = ssim_map(ya.reshape(-1, *ya.shape[-2:]), yb.reshape(-1, *yb.shape[-2:]))
    return float(frames.reshape(frames.shape[0], -1).mean(axis=1).mean())
