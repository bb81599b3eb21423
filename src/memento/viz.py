"""Pictures of who sees what: the attention mask of one trace, coloured by what each key is.

Rows are queries (the token attending), columns are keys (the token attended to). A visible cell
takes the colour of its key's role (prompt and think tags, block reasoning, block delimiters,
memento, answer); hidden cells are grey where the key is in the past but evicted, white where it
is in the future. The mask itself comes from :mod:`memento.masking` (the one rule); this module
only lays it out. Drawing uses matplotlib's Agg canvas directly, so no GUI backend is touched.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memento.format import SpecialTokenIds, UnitSpan

if TYPE_CHECKING:
    from memento.masking import Visibility


class Role(enum.IntEnum):
    """What a token is, for colouring: each role with its legend label and its colour."""

    label: str
    colour: str

    def __new__(cls, value: int, label: str, colour: str) -> Role:
        role = int.__new__(cls, value)
        role._value_ = value
        role.label, role.colour = label, colour
        return role

    PROMPT = 0, "prompt, <think>, </think>, gaps", "#7f7f7f"
    BLOCK = 1, "block reasoning", "#4c72b0"
    BLOCK_DELIMITER = 2, "<|block_start|> / <|block_end|>", "#c44eb8"
    MEMENTO = 3, "memento (with its delimiters)", "#2ca02c"
    ANSWER = 4, "answer", "#e6a800"
    MEMENTO_RECOMPUTED = 5, "memento, recomputed (restart)", "#17becf"


ROLE_LABELS: dict[Role, str] = {role: role.label for role in Role}
ROLE_COLOURS: dict[Role, str] = {role: role.colour for role in Role}
HIDDEN_COLOUR = "#d9d9d9"
FUTURE_COLOUR = "#ffffff"


def token_roles(
    token_ids: Sequence[int] | np.ndarray, specials: SpecialTokenIds, units: Sequence[UnitSpan] | None = None
) -> np.ndarray:
    """The :class:`Role` of every token, as an int array, from the spans the shared grammar found.

    ``units`` are the (block, memento) spans of :mod:`memento.masking` (``Visibility.units``);
    without them the whole sequence is tracked. Everything outside a unit is prompt (the prompt,
    the think tags, whitespace between units: always visible) until the ``</think>`` after the
    last unit, or without a think-end id the last memento, after which comes the answer. A
    memento's role covers its two delimiters.
    """
    from memento.masking import VANILLA, compute_visibility

    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if units is None:
        units = compute_visibility(ids, specials, VANILLA).units
    roles = np.full(len(ids), int(Role.PROMPT), dtype=np.int64)
    answer_from = None
    for span in units:
        block_stop = len(ids) if span.block_end is None else span.block_end
        roles[span.block_start] = Role.BLOCK_DELIMITER
        roles[span.block_start + 1 : block_stop] = Role.BLOCK
        if span.block_end is not None:
            roles[span.block_end] = Role.BLOCK_DELIMITER
        if span.summary_start is not None:
            memento_stop = len(ids) if span.summary_end is None else span.summary_end + 1
            roles[span.summary_start : memento_stop] = Role.MEMENTO
            answer_from = memento_stop
    if answer_from is not None and units[-1].complete:
        if specials.think_end is not None:
            ends = np.flatnonzero(ids[answer_from:] == specials.think_end)
            answer_from = answer_from + int(ends[0]) + 1 if len(ends) else len(ids)
        roles[answer_from:] = Role.ANSWER
    return roles


def row_roles(vis: Visibility, roles: np.ndarray) -> np.ndarray:
    """Roles per row of ``vis`` (the expanded layout in restart mode: copies are 'recomputed')."""
    out = np.asarray(roles)[vis.source].copy()
    is_original = np.zeros(len(vis), dtype=bool)
    is_original[vis.output_rows] = True
    out[~is_original] = Role.MEMENTO_RECOMPUTED
    return out


def mask_summary(vis: Visibility) -> dict[str, Any]:
    """Counts for a title: rows, original tokens, visible fraction of the causal cells, peak live KV."""
    n = len(vis)
    tokens = len(vis.output_rows)
    live = vis.live_kv()
    visible_cells = int(live.sum())
    causal_cells = n * (n + 1) // 2
    peak = int(live.max()) if n else 0
    return {
        "rows": n,
        "tokens": tokens,
        "visible_fraction": visible_cells / causal_cells if causal_cells else 0.0,
        "peak_live_kv": peak,
        "vanilla_peak_kv": tokens,
        "peak_ratio": peak / tokens if tokens else 0.0,
    }


def unit_ticks(vis: Visibility, token_ids: Sequence[int] | None = None, specials: SpecialTokenIds | None = None):
    """(row, label) at each unit boundary: B1 at block 1's start, M1 at its memento's start, ...

    With the token ids and specials, 'A' marks the first answer token after ``</think>``.
    """
    row_of = vis.output_rows
    ticks: list[tuple[int, str]] = []
    for i, span in enumerate(vis.units, start=1):
        ticks.append((int(row_of[span.block_start]), f"B{i}"))
        if span.summary_start is not None:
            ticks.append((int(row_of[span.summary_start]), f"M{i}"))
    if token_ids is not None and specials is not None and specials.think_end is not None:
        ids = np.asarray(token_ids)
        hits = np.flatnonzero(ids == specials.think_end)
        if len(hits) and hits[0] + 1 < len(ids):
            ticks.append((int(row_of[hits[0] + 1]), "A"))
    return ticks


def _rgb(colour: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.asarray(to_rgb(colour), dtype=np.float32)


def mask_image(vis: Visibility, rows_roles: np.ndarray, max_tokens: int | None = None) -> np.ndarray:
    """An (m, m, 3) float RGB image of the first ``m`` rows of the mask (m <= max_tokens).

    The mask is :func:`memento.masking.dense_mask` of the first ``m`` rows' ``invisible_from``,
    which equals ``vis.dense()[:m, :m]`` without building the full L x L mask.
    """
    import torch

    from memento.masking import dense_mask

    n = len(vis)
    m = n if max_tokens is None else min(n, max_tokens)
    mask = dense_mask(torch.from_numpy(np.ascontiguousarray(vis.invisible_from[:m]))[None])[0, 0].numpy()
    palette = np.stack([_rgb(role.colour) for role in Role])
    key_colour = palette[np.asarray(rows_roles[:m], dtype=np.int64)]  # (m, 3), by key column
    image = np.empty((m, m, 3), dtype=np.float32)
    image[:] = _rgb(FUTURE_COLOUR)
    past = np.tril(np.ones((m, m), dtype=bool))
    image[past & ~mask] = _rgb(HIDDEN_COLOUR)
    image[mask] = np.broadcast_to(key_colour[None, :, :], (m, m, 3))[mask]
    return image


def draw_mask_png(
    vis: Visibility,
    roles: np.ndarray,
    path: str | Path,
    title: str,
    *,
    max_tokens: int | None = 512,
    ticks: Sequence[tuple[int, str]] = (),
    note: str | None = None,
    row_label: str = "query (token attending)",
    dpi: int = 150,
) -> Path:
    """Draw the mask of ``vis`` to a PNG; ``roles`` are per row (see :func:`row_roles`).

    Rows are queries and columns keys; only the first ``max_tokens`` rows/columns are drawn.
    ``ticks`` are (row, label) pairs for unit boundaries; ``note`` (e.g. that the picture is
    truncated) becomes the last line of the title. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(vis)
    m = n if max_tokens is None else min(n, max_tokens)
    image = mask_image(vis, roles, m)
    fig = Figure(figsize=(10.5, 8.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, interpolation="nearest", extent=(-0.5, m - 0.5, m - 0.5, -0.5))
    shown = [(r, label) for r, label in ticks if r < m]
    # Thin the labels when there are too many to read (keep every k-th).
    step = max(1, -(-len(shown) // 40))
    shown = shown[::step]
    for r, _ in shown:
        ax.axhline(r - 0.5, color="black", linewidth=0.3, alpha=0.35)
        ax.axvline(r - 0.5, color="black", linewidth=0.3, alpha=0.35)
    positions = [r for r, _ in shown]
    labels = [label for _, label in shown]
    ax.set_xticks(positions, labels, fontsize=8, rotation=90)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=True, labelbottom=True)
    ax.set_xlabel("key (token attended to)")
    ax.set_ylabel(row_label)
    ax.set_title(title if not note else f"{title}\n{note}", fontsize=10)
    present = sorted({int(r) for r in np.asarray(roles[:m])})
    handles = [Patch(facecolor=Role(r).colour, edgecolor="black", label=Role(r).label) for r in present]
    handles += [
        Patch(facecolor=HIDDEN_COLOUR, edgecolor="black", label="hidden: past but evicted"),
        Patch(facecolor=FUTURE_COLOUR, edgecolor="black", label="future (causal)"),
    ]
    ax.legend(
        handles=handles,
        title="visible cell = colour of the key",
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    fig.savefig(path, dpi=dpi, format="png")
    return Path(path)
