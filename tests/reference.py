"""Independent float64 references for the fused ops (pure NumPy / PyTorch).

The noise reference re-implements Philox4x32-10 and Box-Muller in NumPy
from the published algorithm, so the C++/CUDA generator is checked against
code that shares nothing with it.
"""

from __future__ import annotations

import numpy as np
import torch

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of counters ``ctr`` [N, 4] with keys ``key`` [N, 2] (uint32 words)."""
    c = [ctr[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[:, 0].astype(np.uint64), key[:, 1].astype(np.uint64)
    for _ in range(10):
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & _MASK,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & _MASK,
        ]
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return np.stack(c, axis=1).astype(np.uint32)


def philox_normals(n: int, seed: int, offset: int) -> np.ndarray:
    """The n standard normals ``_sgld_step_philox_`` draws, in float64."""
    groups = np.arange((n + 3) // 4, dtype=np.uint64)
    step = np.uint64(offset // 4)
    ctr = np.stack(
        [
            np.full_like(groups, step & _MASK),
            np.full_like(groups, step >> np.uint64(32)),
            groups & _MASK,
            groups >> np.uint64(32),
        ],
        axis=1,
    )
    key = np.tile(np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64), (len(groups), 1))
    words = philox4x32_10(ctr, key).astype(np.float64)
    u_open0 = (np.floor(words / 256.0) + 1.0) * 2.0**-24  # (0, 1]
    u_open1 = np.floor(words / 256.0) * 2.0**-24  # [0, 1)
    z = np.empty((len(groups), 4))
    for a, b in ((0, 1), (2, 3)):
        radius = np.sqrt(-2.0 * np.log(u_open0[:, a]))
        theta = 2.0 * np.pi * u_open1[:, b]
        z[:, a] = radius * np.cos(theta)
        z[:, b] = radius * np.sin(theta)
    return z.reshape(-1)[:n]


def sgld_reference(
    x, grad, xi, step_size, noise_std, clamp_min=None, clamp_max=None, grad_clip=None
) -> torch.Tensor:
    """The SGLD update in float64 given the noise ``xi``."""
    x, grad, xi = x.double(), grad.double(), xi.double()
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    out = x - step_size * grad + noise_std * xi
    if clamp_min is not None or clamp_max is not None:
        out = out.clamp(clamp_min, clamp_max)
    return out


def energy_reference(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E = -logsumexp(logits) or -logits[y], in float64."""
    lg = logits.double()
    if y is None:
        return -torch.logsumexp(lg, dim=1)
    return -lg.gather(1, y.unsqueeze(1)).squeeze(1)
