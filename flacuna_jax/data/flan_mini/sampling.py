"""Seeded, machine-independent sampling without replacement, and per-record random draws.

Every unit (a row, or one (row, solution) pair of a code dataset) gets a 64-bit key hashed from
(seed, source name, row, sub-index) with splitmix64 in plain uint64 arithmetic: the same bits on
every machine, independent of how the rows are read, batched or split over workers. A source's
sample is its ``count`` units of smallest key (ties broken by unit order), which is a uniform
sample without replacement; the same key order is the records' order in the source's shard. A
smaller ``--scale`` takes a prefix of that order, so a scaled build is a subset of the full one.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def stream_seed(seed: int, name: str) -> int:
    """A 64-bit seed for one source of one build."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little")


def unit_keys(seed64: int, rows: np.ndarray, subs: np.ndarray | None = None) -> np.ndarray:
    """Keys of units ``(rows[i], subs[i])`` (uint64)."""
    with np.errstate(over="ignore"):
        x = np.asarray(rows, np.uint64) * _GOLDEN + np.uint64(seed64)
        x = _mix(x)
        if subs is not None:
            x = _mix(x ^ (np.asarray(subs, np.uint64) * _GOLDEN + np.uint64(0x632BE59BD9B4E019)))
        return x


def key_order(keys: np.ndarray) -> np.ndarray:
    """Unit indices by increasing key (a stable sort: equal keys keep unit order)."""
    return np.argsort(keys, kind="stable")


class Draws:
    """A splitmix64 stream for one record's choices (template, shots, exemplars): cheap to make,
    identical on every machine and Python version (unlike ``random.Random``'s helpers)."""

    def __init__(self, seed64: int):
        self.state = int(seed64) & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Uniform in [0, n) (the modulo bias of 64 random bits is < 2^-40 here)."""
        if n <= 0:
            raise ValueError(f"below({n})")
        return self.next() % n

    def chance(self, p: float) -> bool:
        """True with probability ``p``: 53 random bits against p (exact for p in {0, 1})."""
        return (self.next() >> 11) < p * (1 << 53)

    def pick(self, n: int, k: int) -> list[int]:
        """``k`` distinct indices in [0, n), in draw order (a partial Fisher-Yates shuffle)."""
        k = min(k, n)
        pool = list(range(n))
        for i in range(k):
            j = i + self.below(n - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]
