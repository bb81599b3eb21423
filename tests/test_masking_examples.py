"""Worked examples: one short trace, its expected mask drawn by hand for every knob setting.

The trace (one token per position)::

    pos  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
         P  T  [  a  ]  (  m  )  [  b  ]  (  n  )  /  A

P prompt, T ``<think>``, ``[``/``]`` block start/end, a/b block reasoning, ``(``/``)`` summary
start/end, m/n mementos, ``/`` ``</think>``, A answer. In the matrices a row is a query, a column a
key; ``x`` = visible, ``.`` = hidden. Read a row left to right to see what that token attends to.
"""

from __future__ import annotations

import numpy as np
import pytest

from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import NEVER, MaskConfig, MementoTracker, compute_visibility

SPECIALS = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4, think_start=5, think_end=6)
BS, BE, SS, SE, TH, TE = 1, 2, 3, 4, 5, 6
P, A_, B_, M_, N_, ANS = 10, 20, 21, 30, 31, 40
TRACE = [P, TH, BS, A_, BE, SS, M_, SE, BS, B_, BE, SS, N_, SE, TE, ANS]


def drawn(rows: str) -> np.ndarray:
    """Parse a hand-drawn matrix (one row per line, x/. per column, spaces ignored)."""
    lines = [line.split("#")[0].replace(" ", "") for line in rows.strip().splitlines()]
    return np.array([[c == "x" for c in line] for line in lines if line])


def mask_of(ids: list[int], config: MaskConfig, **kwargs) -> np.ndarray:
    return compute_visibility(ids, SPECIALS, config, **kwargs).dense().numpy()


CAUSAL_16 = "\n".join("x" * (i + 1) + "." * (15 - i) for i in range(16))


def test_vanilla_is_the_causal_mask() -> None:
    np.testing.assert_array_equal(mask_of(TRACE, MaskConfig(keep_last_n=-1)), drawn(CAUSAL_16))


def test_memento_keep_0() -> None:
    # Block a (pos 3) hides from its ")" (pos 7) on; block b (pos 9) from pos 13 on. The block
    # delimiters stay, and each memento (rows 5-6, 11-12) still sees its own block.
    expected = """
        x . . . . . . . . . . . . . . .   # 0  P
        x x . . . . . . . . . . . . . .   # 1  <think>
        x x x . . . . . . . . . . . . .   # 2  [
        x x x x . . . . . . . . . . . .   # 3  a
        x x x x x . . . . . . . . . . .   # 4  ]
        x x x x x x . . . . . . . . . .   # 5  (
        x x x x x x x . . . . . . . . .   # 6  m
        x x x . x x x x . . . . . . . .   # 7  )   a is gone, from this token on
        x x x . x x x x x . . . . . . .   # 8  [
        x x x . x x x x x x . . . . . .   # 9  b
        x x x . x x x x x x x . . . . .   # 10 ]
        x x x . x x x x x x x x . . . .   # 11 (
        x x x . x x x x x x x x x . . .   # 12 n
        x x x . x x x x x . x x x x . .   # 13 )   b is gone too
        x x x . x x x x x . x x x x x .   # 14 </think>
        x x x . x x x x x . x x x x x x   # 15 answer
    """
    np.testing.assert_array_equal(mask_of(TRACE, MaskConfig(keep_last_n=0)), drawn(expected))


def test_keep_last_1() -> None:
    # The newest finished block stays: a hides only when b's memento ends (pos 13); b never hides.
    expected = """
        x . . . . . . . . . . . . . . .
        x x . . . . . . . . . . . . . .
        x x x . . . . . . . . . . . . .
        x x x x . . . . . . . . . . . .
        x x x x x . . . . . . . . . . .
        x x x x x x . . . . . . . . . .
        x x x x x x x . . . . . . . . .
        x x x x x x x x . . . . . . . .
        x x x x x x x x x . . . . . . .
        x x x x x x x x x x . . . . . .
        x x x x x x x x x x x . . . . .
        x x x x x x x x x x x x . . . .
        x x x x x x x x x x x x x . . .
        x x x . x x x x x x x x x x . .   # 13 )  a is gone
        x x x . x x x x x x x x x x x .
        x x x . x x x x x x x x x x x x
    """
    np.testing.assert_array_equal(mask_of(TRACE, MaskConfig(keep_last_n=1)), drawn(expected))


def test_mask_delimiters() -> None:
    # Phi-4 style: the block's [ and ] hide together with its reasoning.
    expected = """
        x . . . . . . . . . . . . . . .
        x x . . . . . . . . . . . . . .
        x x x . . . . . . . . . . . . .
        x x x x . . . . . . . . . . . .
        x x x x x . . . . . . . . . . .
        x x x x x x . . . . . . . . . .
        x x x x x x x . . . . . . . . .
        x x . . . x x x . . . . . . . .   # 7  ) [ a ] gone
        x x . . . x x x x . . . . . . .
        x x . . . x x x x x . . . . . .
        x x . . . x x x x x x . . . . .
        x x . . . x x x x x x x . . . .
        x x . . . x x x x x x x x . . .
        x x . . . x x x . . . x x x . .   # 13 ) [ b ] gone
        x x . . . x x x . . . x x x x .
        x x . . . x x x . . . x x x x x
    """
    np.testing.assert_array_equal(mask_of(TRACE, MaskConfig(keep_last_n=0, mask_delimiters=True)), drawn(expected))


def test_keep_last_block_for_answer() -> None:
    # a stays after its memento and hides only when the next block starts (pos 8, that token
    # included); b is the last block, so the answer still sees it.
    expected = """
        x . . . . . . . . . . . . . . .
        x x . . . . . . . . . . . . . .
        x x x . . . . . . . . . . . . .
        x x x x . . . . . . . . . . . .
        x x x x x . . . . . . . . . . .
        x x x x x x . . . . . . . . . .
        x x x x x x x . . . . . . . . .
        x x x x x x x x . . . . . . . .   # 7  ) a still visible
        x x x . x x x x x . . . . . . .   # 8  [ a gone as the next block starts
        x x x . x x x x x x . . . . . .
        x x x . x x x x x x x . . . . .
        x x x . x x x x x x x x . . . .
        x x x . x x x x x x x x x . . .
        x x x . x x x x x x x x x x . .
        x x x . x x x x x x x x x x x .
        x x x . x x x x x x x x x x x x   # 15 answer sees b
    """
    config = MaskConfig(keep_last_n=0, keep_last_block_for_answer=True)
    np.testing.assert_array_equal(mask_of(TRACE, config), drawn(expected))


def test_restart_layout() -> None:
    # Restart: at ")" the block (with delimiters) and the memento as generated are dropped, and the
    # memento is recomputed (rows m'/n', inserted before ")", same logical positions) without its
    # block. Later tokens see only the recomputed copies.
    vis = compute_visibility(TRACE, SPECIALS, MaskConfig(keep_last_n=0, restart=True))
    #   row:  0  1  2  3  4  5  6  7   8   9  10 11 12 13 14 15  16  17 18 19
    #         P  T  [  a  ]  (  m  (' m'  )  [  b  ]  (  n  (' n'  )  /  A
    assert vis.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12, 11, 12, 13, 14, 15]
    assert vis.token_ids.tolist() == [P, TH, BS, A_, BE, SS, M_, SS, M_, SE, BS, B_, BE, SS, N_, SS, N_, SE, TE, ANS]
    expected = """
        x . . . . . . . . . . . . . . . . . . .   # 0  P
        x x . . . . . . . . . . . . . . . . . .   # 1  <think>
        x x x . . . . . . . . . . . . . . . . .   # 2  [
        x x x x . . . . . . . . . . . . . . . .   # 3  a
        x x x x x . . . . . . . . . . . . . . .   # 4  ]
        x x x x x x . . . . . . . . . . . . . .   # 5  (   as generated: sees its block
        x x x x x x x . . . . . . . . . . . . .   # 6  m
        x x . . . . . x . . . . . . . . . . . .   # 7  (' recomputed: no block, no original
        x x . . . . . x x . . . . . . . . . . .   # 8  m'
        x x . . . . . x x x . . . . . . . . . .   # 9  )
        x x . . . . . x x x x . . . . . . . . .   # 10 [
        x x . . . . . x x x x x . . . . . . . .   # 11 b
        x x . . . . . x x x x x x . . . . . . .   # 12 ]
        x x . . . . . x x x x x x x . . . . . .   # 13 (
        x x . . . . . x x x x x x x x . . . . .   # 14 n
        x x . . . . . x x x . . . . . x . . . .   # 15 ('
        x x . . . . . x x x . . . . . x x . . .   # 16 n'
        x x . . . . . x x x . . . . . x x x . .   # 17 )
        x x . . . . . x x x . . . . . x x x x .   # 18 </think>
        x x . . . . . x x x . . . . . x x x x x   # 19 answer
    """
    np.testing.assert_array_equal(vis.dense().numpy(), drawn(expected))
    # The logits of original token t are read at output_rows[t]: the memento as generated (rows 5,
    # 6) predicts the next memento token and ")", the rest shift past the inserted copies.
    assert vis.output_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 17, 18, 19]


ASSISTANT = [90, 91]  # stands for the ids of "<|im_start|>assistant\n"
# A user quotes a whole unit in the prompt, then the assistant answers with one unit:
#   pos 0  1  2  3  4  5  6   7   8  9 10 11 12 13 14 15 16
#       [  q  ]  (  r  )  U1  U2  T  [  a  ]  (  m  )  /  A
QUOTED = [BS, 11, BE, SS, 12, SE, *ASSISTANT, TH, BS, A_, BE, SS, M_, SE, TE, ANS]


def test_require_assistant_section_ignores_quoted_tokens() -> None:
    # Only the assistant's block (pos 10) hides, from its ")" (pos 14) on;
    # the quoted prompt block (pos 1) stays visible.
    config = MaskConfig(keep_last_n=0, require_assistant_section=True)
    vis = compute_visibility(QUOTED, SPECIALS, config, assistant_prefix=ASSISTANT)
    assert vis.tracking_from == 8
    assert [(e.at, e.evicted.start, e.evicted.stop) for e in vis.events] == [(14, 10, 11)]
    hidden = ~vis.dense().numpy() & np.tril(np.ones((17, 17), dtype=bool))
    assert np.argwhere(hidden).tolist() == [[14, 10], [15, 10], [16, 10]]


def test_without_assistant_section_the_prompt_is_tracked_too() -> None:
    # The same sequence tracked from the start: the quoted block hides from its ")" (pos 5) on.
    vis = compute_visibility(QUOTED, SPECIALS, MaskConfig(keep_last_n=0))
    assert [(e.at, e.evicted.start, e.evicted.stop) for e in vis.events] == [(5, 1, 2), (14, 10, 11)]


def test_quoted_fragment_is_harmless_only_inside_the_prompt() -> None:
    lone_end = [SE, 50, *ASSISTANT, TH, BS, A_, BE, SS, M_, SE, TE]
    with pytest.raises(MementoFormatError, match="<\\|summary_end\\|> without <\\|summary_start\\|>") as err:
        compute_visibility(lone_end, SPECIALS, MaskConfig())
    assert err.value.position == 0
    config = MaskConfig(require_assistant_section=True)
    vis = compute_visibility(lone_end, SPECIALS, config, assistant_prefix=ASSISTANT)
    assert [(e.at, e.evicted.start, e.evicted.stop) for e in vis.events] == [(10, 6, 7)]


def test_tracker_emits_the_events_an_engine_applies() -> None:
    tracker = MementoTracker(SPECIALS, MaskConfig(keep_last_n=0))
    emitted = {pos: tracker.feed(tok) for pos, tok in enumerate(TRACE)}
    assert {pos: [(e.evicted.start, e.evicted.stop) for e in evs] for pos, evs in emitted.items() if evs} == {
        7: [(3, 4)],
        13: [(9, 10)],
    }
    assert tracker.position == len(TRACE)
    assert [(u.block_start, u.block_end, u.summary_start, u.summary_end) for u in tracker.units] == [
        (2, 4, 5, 7),
        (8, 10, 11, 13),
    ]


@pytest.mark.parametrize(
    ("ids", "position", "reason"),
    [
        ([TH, BS, A_, BS], 3, "nested <|block_start|>"),
        ([TH, BS, BE], 2, "empty block"),
        ([TH, BS, A_, BE, SS, SE], 5, "empty memento"),
        ([TH, SS, M_, SE], 1, "memento without a block"),
        ([TH, BS, A_, BE, BS], 4, "has no memento"),
        ([TH, BS, A_, SS], 3, "its <|block_end|> is missing"),
        ([TH, BS, A_, BE, SS, M_, SE, TE, BS], 8, "after </think>"),
        ([TH, BS, A_, TE], 3, "left open"),
    ],
)
def test_malformed_input_names_the_defect(ids: list[int], position: int, reason: str) -> None:
    with pytest.raises(MementoFormatError) as err:
        compute_visibility(ids, SPECIALS, MaskConfig())
    assert err.value.position == position
    assert reason in err.value.reason


def test_a_prefix_with_an_open_block_is_fine() -> None:
    # An engine sees prefixes: a block still open at the end is no defect.
    vis = compute_visibility([P, TH, BS, A_, BE, SS, M_, SE, BS, B_], SPECIALS, MaskConfig())
    assert [(e.at, e.evicted.start, e.evicted.stop) for e in vis.events] == [(7, 3, 4)]


def test_stop_tracking_on_error_keeps_earlier_evictions_and_tracks_nothing_after() -> None:
    ids = [TH, BS, A_, BE, SS, M_, SE, SE, A_, BS, A_]  # the second <|summary_end|> (index 7) is the defect
    with pytest.raises(MementoFormatError) as err:
        compute_visibility(ids, SPECIALS, MaskConfig())
    assert err.value.position == 7
    vis = compute_visibility(ids, SPECIALS, MaskConfig(), stop_tracking_on_error=True)
    head = compute_visibility(ids[:7], SPECIALS, MaskConfig())
    assert vis.invisible_from.tolist() == head.invisible_from.tolist() + [NEVER] * 4
    assert vis.invisible_from[2] == 6  # the block's reasoning still hides from its <|summary_end|>
    assert vis.position_ids.tolist() == list(range(len(ids)))
    assert vis.output_rows.tolist() == list(range(len(ids)))
    assert vis.events == head.events
    # Restart mode: the tail follows the expanded head, at its own logical positions.
    restart = MaskConfig(restart=True)
    vis = compute_visibility(ids, SPECIALS, restart, stop_tracking_on_error=True)
    head = compute_visibility(ids[:7], SPECIALS, restart)
    assert len(vis) == len(head) + 4
    assert vis.position_ids[len(head) :].tolist() == [7, 8, 9, 10]
    assert vis.output_rows.tolist() == head.output_rows.tolist() + list(range(len(head), len(head) + 4))
