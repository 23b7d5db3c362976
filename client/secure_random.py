"""The site's randomness for DP-SGD: ChaCha20 keystreams keyed from os.urandom.

The privacy of DP-SGD rests on two random draws the server must not be able to reproduce:
which subjects each step samples (privacy amplification by Poisson subsampling) and the
Gaussian noise added to the clipped sum. torch's generators are seeded with at most 64 bits
and their output reveals their state (Mersenne Twister), and Opacus's `secure_mode` needs
torchcsprng, which does not build for the pinned torch. So each round draws two independent
256-bit keys from the operating system's CSPRNG, one per stream, and expands each with the
ChaCha20 stream cipher (RFC 8439, through `cryptography`/OpenSSL): its output reveals
neither the key nor any other part of the stream.

Uniforms take the top 53 bits of each 64-bit word, so they lie on the float64 grid in (0, 1).
Gaussians use the Box-Muller transform in float64 (Box & Muller 1958).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32  # 256-bit ChaCha20 key
NONCE_BYTES = 16  # cryptography's ChaCha20 nonce: 4-byte block counter + 12-byte nonce


class SecureRandom:
    """One ChaCha20 keystream turned into uniforms, Bernoulli masks and Gaussians."""

    def __init__(self, key: bytes | None = None) -> None:
        """`key` (32 bytes) is for tests that need to replay a stream; by default 32 fresh bytes of os.urandom."""
        key = os.urandom(KEY_BYTES) if key is None else key
        if len(key) != KEY_BYTES:
            raise ValueError(f"SecureRandom needs a {KEY_BYTES}-byte key, got {len(key)} bytes")
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(NONCE_BYTES)), mode=None).encryptor()

    def uniform(self, n: int) -> np.ndarray:
        """n float64 uniforms in the open interval (0, 1)."""
        words = np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """n independent draws that are True with probability p (Poisson sampling of n items)."""
        return self.uniform(n) < p

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        """A float64 tensor of independent N(0, std²) draws."""
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log(u[0]))
        angle = 2.0 * math.pi * u[1]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z * std).reshape(shape)


def fresh_seed() -> int:
    """64 bits of os.urandom for torch generators whose draws are not privacy-critical."""
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
