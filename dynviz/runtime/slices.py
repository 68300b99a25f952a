"""The store of convs sliced to recurring channel sets, shared by the sparse path's calls.

It knows a conv only by what it is given (``FoldedConv.restrict``, ``nbytes``), so the folded
blocks that take it as an argument and the sparse path that owns it both import it, and it
imports neither.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

import torch


class Sliceable(Protocol):
    """What the store needs of a conv (``dynviz.runtime.folded.FoldedConv``)."""
    weight: torch.Tensor

    @property
    def nbytes(self) -> int: ...

    def restrict(self, out_ch: torch.Tensor | None = None,
                 in_ch: torch.Tensor | None = None) -> "Sliceable": ...


class SliceCache:
    """A thread-safe LRU of convs sliced to a channel set (``FoldedConv.restrict``), keyed by
    the conv's weight, the dimension sliced and the set.

    Gathering a slice of a wide conv weight costs a good share of the conv itself at batch 1
    (docs/benchmarks.md); trained C-Nets reuse a few channel sets over and over, so keeping
    the sliced convs pays. Entries are immutable; the cache evicts least-recently-used ones
    beyond ``max_bytes``. The native runner keeps its slices in a store of its own
    (``SliceStore`` in ``models/csrc/blocks.cpp``) with the same rules, within this
    ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 256 << 20, max_seen: int = 4096):
        self.max_bytes = max_bytes
        self.max_seen = max_seen
        self._entries: OrderedDict[tuple, Sliceable] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """A copy starts empty, with a lock of its own."""
        return {"max_bytes": self.max_bytes, "max_seen": self.max_seen}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @staticmethod
    def channel_key(channels: torch.Tensor) -> bytes:
        """A channel set as part of a key; made once per block."""
        return channels.cpu().numpy().tobytes()

    @staticmethod
    def key(weight: torch.Tensor, dim: int, channel_key: bytes) -> tuple:
        return (weight.data_ptr(), weight._version, tuple(weight.shape), dim, channel_key)

    def recurring(self, key: tuple) -> bool:
        """True if ``key``'s conv is cached or its channel set was met before. A set met
        for the first time is only remembered: gathering slices pays when a set recurs (a
        trained C-Net's few favourite sets), not for one-off per-image patterns."""
        with self._lock:
            if key in self._entries or key in self._seen:
                return True
            self._seen[key] = None
            if len(self._seen) > self.max_seen:
                self._seen.popitem(last=False)
            return False

    def conv(self, conv: Sliceable, dim: int, channels: torch.Tensor,
             channel_key: bytes) -> Sliceable:
        """``conv`` restricted to ``channels`` of its output (``dim`` 0) or input (1)."""
        key = self.key(conv.weight, dim, channel_key)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        sliced = conv.restrict(out_ch=channels) if dim == 0 else conv.restrict(in_ch=channels)
        size = sliced.nbytes
        if size > self.max_bytes:
            return sliced
        with self._lock:
            if key not in self._entries:
                self._entries[key] = sliced
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= old.nbytes
        return sliced

    def __len__(self) -> int:
        return len(self._entries)
