"""The vLLM backend's eviction bookkeeping (memento.vllm.eviction), without vLLM.

A small simulator plays vLLM's part: a request's KV is a list of what each physical slot holds,
prefill runs in chunks of random size (cut where ``next_stop`` says), one token becomes known per
decode step, and preemption drops everything at random moments. Before every token is computed,
the KV it attends to (the physical slots, then the chunk's earlier tokens) must be exactly the rows
that :func:`memento.masking.compute_visibility` says that token sees, for every mask setting,
restart included. This is the layout the real worker builds with the same compactions.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memento.format import MementoFormatError
from memento.masking import MaskConfig, SequenceTracker, Visibility, compute_visibility
from memento.vllm.eviction import Compaction, RequestEvictions
from strategies import examples, mask_cases


def visible_rows(vis: Visibility, row: int) -> set[int]:
    return {k for k in range(row + 1) if row < vis.invisible_from[k]}


def copy_rows(vis: Visibility) -> dict[int, int]:
    """Restart layout: (event at, memento token) -> the row of its recomputed copy."""
    row_of = vis.output_rows
    copies = {}
    for ev in vis.events:
        first = int(row_of[ev.at]) - len(ev.recompute)
        for i, t in enumerate(ev.recompute):
            copies[(ev.at, t)] = first + i
    return copies


def apply(kv: list[int], compaction: Compaction) -> list[int]:
    out = list(kv)
    for src, dst, length in compaction.moves:
        out[dst : dst + length] = kv[src : src + length]  # read the sources before writing
        kv = list(out)
    return out[: compaction.num_tokens]


def simulate(ids, specials, config: MaskConfig, prefix, prompt_len: int, rng: random.Random) -> RequestEvictions:
    """Run one request to the end through the simulator, checking every token's view."""
    vis = compute_visibility(ids, specials, config, prefix)
    copies = copy_rows(vis)
    row_of = vis.output_rows
    state = RequestEvictions(SequenceTracker(specials, config, prefix, stop_on_format_error=True))
    state.feed(ids[:prompt_len])
    known, computed, kv = prompt_len, 0, []
    recompute: tuple[int, int] | None = None  # (event at, memento start) while its copy is computed
    while computed < len(ids):
        applied = state.apply_due(computed)
        if applied is not None:
            kv = apply(kv, applied.compaction)
            if applied.rewind_to is not None:
                recompute = (computed, applied.rewind_to)
                computed = applied.rewind_to
        assert len(kv) == computed - state.shift
        stop = state.next_stop(computed)
        count = min(known - computed, rng.randint(1, 6))
        if stop is not None:
            assert stop > computed
            count = min(count, stop - computed)
        for t in range(computed, computed + count):
            if recompute is not None and recompute[1] <= t < recompute[0]:
                row = copies[(recompute[0], t)]
            else:
                row = int(row_of[t])
            assert set(kv) | {row} == visible_rows(vis, row), f"token {t} sees the wrong KV"
            assert len(set(kv)) == len(kv)
            kv.append(row)
        computed += count
        if recompute is not None and computed >= recompute[0]:
            recompute = None
        if computed == known and known < len(ids):
            known += 1  # the token "sampled" by this step becomes known
            state.feed(ids[known - 1 : known])
        if rng.random() < 0.08:  # preemption: all KV gone, recompute from scratch
            kv, computed, recompute = [], 0, None
            state.reset(ids[:known])
    assert state.pending == type(state.pending)()
    assert state.applied.evictions == len(vis.events)
    assert state.applied.evicted_tokens == sum(len(ev.evicted) for ev in vis.events)
    return state


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mask_cases(truncate=False), seed=st.integers(0, 2**16), split=st.floats(0, 1))
def test_every_token_sees_exactly_its_masked_view(case, seed, split):
    ids = list(case.ids)
    prompt_len = max(1, int(len(ids) * split)) if ids else 0
    if not ids:
        return
    simulate(ids, case.specials, case.config, case.prefix, prompt_len, random.Random(seed))


def test_a_block_evicted_in_decode_slides_its_memento_down():
    """One unit, decoded token by token: at <|summary_end|> the memento moves over the block."""
    from memento.format import SpecialTokenIds

    sp = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4)
    ids = [9, 9, 1, 7, 7, 7, 2, 3, 8, 4, 9]  # prompt 2, block 7 7 7, memento 8
    state = RequestEvictions(SequenceTracker(sp, MaskConfig(keep_last_n=0), stop_on_format_error=True))
    state.feed(ids[:9])
    assert state.next_stop(0) is None  # nothing closes inside these tokens
    state.feed([4])  # <|summary_end|> sampled at position 9
    assert state.next_stop(0) == 9
    applied = state.apply_due(9)
    # delimiters stay: tokens 3..5 go, 6..8 (block end, summary start, memento) slide from 6 to 3
    assert applied.compaction == Compaction(moves=((6, 3, 3),), num_tokens=6)
    assert applied.rewind_to is None and state.shift == 3
    assert state.physical(9) == 6 and state.is_evicted(4) and not state.is_evicted(6)
    assert state.applied.evictions == 1 and state.applied.evicted_tokens == 3


def test_restart_rewinds_to_the_memento():
    from memento.format import SpecialTokenIds

    sp = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4)
    ids = [9, 1, 7, 7, 2, 3, 8, 8, 4]
    state = RequestEvictions(SequenceTracker(sp, MaskConfig(keep_last_n=0, restart=True), stop_on_format_error=True))
    state.feed(ids)
    applied = state.apply_due(8)
    assert applied.compaction == Compaction(moves=(), num_tokens=1)  # only the prompt token stays
    assert applied.rewind_to == 5  # recompute <|summary_start|> 8 8, then feed <|summary_end|>
    assert state.shift == 4  # the block and its delimiters are gone for good
    assert 5 - state.shift == 1  # the memento is recomputed right after the prompt


def test_a_chunk_that_ran_past_an_eviction_is_an_error():
    from memento.format import SpecialTokenIds

    sp = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4)
    state = RequestEvictions(SequenceTracker(sp, MaskConfig(keep_last_n=0), stop_on_format_error=True))
    state.feed([1, 7, 2, 3, 8, 4, 9])
    with pytest.raises(RuntimeError, match="eviction missed"):
        state.apply_due(6)


def test_broken_structure_raises_or_stops_tracking():
    from memento.format import SpecialTokenIds

    sp = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4)
    strict = RequestEvictions(SequenceTracker(sp, MaskConfig(keep_last_n=0), stop_on_format_error=True))
    with pytest.raises(MementoFormatError):
        strict.feed([1, 7, 2, 3, 8, 4, 4])
    lenient = RequestEvictions(SequenceTracker(sp, MaskConfig(keep_last_n=0), stop_on_format_error=False))
    lenient.feed([1, 7, 2, 3, 8, 4, 4, 1, 7, 2, 3, 8, 4])  # the second <|summary_end|> in a row is the defect
    assert lenient.tracker.structure_error is not None and lenient.tracker.structure_error.position == 6
    assert [ev.at for ev in lenient.pending] == [5]  # evictions before the defect stand; none after


def test_final_shift_counts_pending_events():
    from memento.format import SpecialTokenIds

    sp = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4)
    state = RequestEvictions(SequenceTracker(sp, MaskConfig(keep_last_n=0), stop_on_format_error=True))
    state.feed(np.array([1, 7, 7, 2, 3, 8, 4, 1, 7, 2, 3, 8, 4]))
    assert state.shift == 0 and state.final_shift() == 3
