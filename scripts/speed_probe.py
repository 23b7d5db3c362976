"""How fast this machine is right now: seconds for a fixed torch workload on one thread.

The 2-core machine's speed varies within a day (the same demo rounds took 19 s at one hour and
45 s at another), so scripts/fresh_clone_timing.sh runs this before and after what it times:
a wall time is then read against the probe of the same hour. The workload is a small
convolution stack at the demo's latent size, forward and backward, like a DP-SGD step.
"""

from __future__ import annotations

import time

import torch


def probe(repeats: int = 30) -> float:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)])
    x = torch.randn(32, 64, 16, 16, generator=generator)  # -> [B, C, 16, 16], the demo's latent grid
    layers(x).square().mean().backward()  # warm-up: allocator and kernels
    start = time.perf_counter()
    for _ in range(repeats):
        layers(x).square().mean().backward()
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"{probe():.3f}")
