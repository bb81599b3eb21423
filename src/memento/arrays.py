"""A table of int64 columns that grows by doubling.

The engine and masking.py's :class:`~memento.masking.RowLayout` append rows at every step and read
whole columns at every forward pass: appends must stay amortised O(1) and reads must be views,
not copies of Python lists. Each column is contiguous (the array is column-major).
"""

from __future__ import annotations

import numpy as np


class GrowingTable:
    """``columns`` int64 columns; ``size`` rows in use. Column views are valid until the next growth."""

    def __init__(self, columns: int, capacity: int = 64) -> None:
        self.data = np.zeros((columns, capacity), dtype=np.int64)
        self.size = 0

    def column(self, index: int) -> np.ndarray:
        """The rows in use of one column (a view: copy before keeping)."""
        return self.data[index, : self.size]

    def reserve(self, size: int) -> None:
        """Room for ``size`` rows, at least doubling the capacity when it grows."""
        capacity = self.data.shape[1]
        if size > capacity:
            grown = np.zeros((self.data.shape[0], max(size, 2 * capacity)), dtype=np.int64)
            grown[:, : self.size] = self.data[:, : self.size]
            self.data = grown

    def append(self, *columns: np.ndarray | int) -> None:
        """Rows whose columns are ``columns``: arrays of one length (the first is an array), or scalars."""
        start, count = self.size, len(columns[0])
        self.reserve(start + count)
        for index, values in enumerate(columns):
            self.data[index, start : start + count] = values
        self.size = start + count

    def append_row(self, *values: int) -> None:
        """One row (the common case of a decode step, without the array machinery of :meth:`append`)."""
        if self.size == self.data.shape[1]:
            self.reserve(self.size + 1)
        self.data[:, self.size] = values
        self.size += 1

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the rows in use where ``rows`` (a boolean mask over them) is True, in order."""
        kept = self.data[:, : self.size][:, rows]
        self.data[:, : kept.shape[1]] = kept
        self.size = kept.shape[1]
