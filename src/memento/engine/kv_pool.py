"""The KV pool: one preallocated key and value tensor per layer, handed out one token slot at a time.

Slot-based (a page of one token) rather than paged: a memento eviction removes an arbitrary token
range from the middle of a sequence, and with one-token slots that range goes straight back to the
free list; the sequence's slot table (its live tokens in order) simply drops the entries, so no
KV bytes ever move. The attention reads a sequence's live keys by gathering its slot table.

Slot 0 is scratch: padding rows of a batch write there and padding keys read from there (and are
masked out), so real slots are ``1..capacity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVPoolExhausted(RuntimeError):
    """Raised when more slots are asked for than are free (the scheduler checks first)."""


@dataclass(frozen=True)
class KVGeometry:
    """What one token's KV costs: layers x (key + value) x kv heads x head dim x dtype size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @classmethod
    def from_config(cls, config, dtype: torch.dtype) -> KVGeometry:
        """Read the geometry from an HF config (``head_dim`` if set, else hidden / heads)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)


class KVPool:
    """``capacity`` token slots of KV for every layer, with a free list."""

    def __init__(self, geometry: KVGeometry, capacity: int, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"the KV pool needs at least one token slot, got {capacity}")
        self.geometry = geometry
        self.capacity = capacity
        shape = (capacity + 1, geometry.num_kv_heads, geometry.head_dim)
        self.keys = [torch.zeros(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.num_layers)]
        self.values = [torch.zeros(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.num_layers)]
        # Pop from the end: the lowest slots are handed out first.
        self._free: list[int] = list(range(capacity, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, count: int) -> list[int]:
        """``count`` free slots (raises KVPoolExhausted if there are fewer)."""
        if count > len(self._free):
            raise KVPoolExhausted(f"asked for {count} KV slots, {len(self._free)} free of {self.capacity}")
        if count <= 0:
            return []
        taken = self._free[-count:]
        del self._free[-count:]
        taken.reverse()
        return taken

    def free(self, slots: list[int]) -> None:
        """Return slots to the pool (their contents become garbage)."""
        self._free.extend(reversed(slots))
