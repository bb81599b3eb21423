"""Property tests of memento.masking against an independent, naive oracle.

The oracle (:func:`oracle_layout`) is written from the specification alone: it finds the units with
the grammar oracle in ``strategies.py`` and then, query by query, collects the tokens that are
already evicted (O(T^2) Python, no ``invisible_from``). Every property compares what
:mod:`memento.masking` produces (dense masks, tracker events, batches, mask_mod) with it or with
each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import (
    NEVER,
    MaskConfig,
    MementoTracker,
    RowLayout,
    SequenceTracker,
    Visibility,
    build_batch,
    collate_visibility,
    compute_visibility,
    make_mask_mod,
)
from strategies import (
    Malformed,
    MaskCase,
    Unit,
    examples,
    mask_cases,
    mask_configs,
    masking_sequences,
    masking_verdict,
)

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

# ----------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the forward pass: which original token it carries, and whether it is a copy."""

    source: int
    copy: bool


@dataclass(frozen=True)
class Expected:
    rows: list[Row]
    mask: np.ndarray  # (rows, rows) bool
    units: list[Unit]
    tracking_from: int | None

    def row_of(self, source: int) -> int:
        return next(r for r, row in enumerate(self.rows) if row.source == source and not row.copy)


def reasoning(unit: Unit, mask_delimiters: bool) -> range:
    assert unit.be is not None
    return range(unit.bs, unit.be + 1) if mask_delimiters else range(unit.bs + 1, unit.be)


def oracle_layout(case: MaskCase) -> Expected:
    """Rows and the mask the specification prescribes; raises ``Malformed`` for a defect."""
    ids, config = case.ids, case.config
    start, units = masking_verdict(ids, case.vocab, config, case.prefix)
    n = len(ids)
    if config.restart:
        rows: list[Row] = []
        first_copy: dict[int, int] = {}
        for t in range(n):
            for k, unit in enumerate(units):
                if unit.se == t:  # the memento is recomputed just before its summary_end
                    first_copy[k] = len(rows)
                    rows += [Row(j, True) for j in range(unit.ss, unit.se)]  # type: ignore[arg-type]
            rows.append(Row(t, False))
        original = {row.source: r for r, row in enumerate(rows) if not row.copy}
        mask = np.zeros((len(rows), len(rows)), dtype=bool)
        for q in range(len(rows)):
            gone: set[int] = set()
            for k, row in first_copy.items():
                if q >= row:  # block, gap and memento (bs .. se-1) are gone from the first copy on
                    gone.update(original[j] for j in range(units[k].bs, units[k].se))  # type: ignore[arg-type]
            for kv in range(q + 1):
                mask[q, kv] = kv not in gone
        return Expected(rows, mask, units, start)

    keep = config.keep_last_n
    dies_at: dict[int, int] = {}  # unit -> first query that no longer sees its reasoning
    if keep >= 0:
        for k in range(len(units)):
            if config.keep_last_block_for_answer:
                if k + keep + 1 < len(units):
                    dies_at[k] = units[k + keep + 1].bs
            elif k + keep < len(units) and units[k + keep].se is not None:
                dies_at[k] = units[k + keep].se  # type: ignore[assignment]
    mask = np.zeros((n, n), dtype=bool)
    for q in range(n):
        gone = set()
        for k, at in dies_at.items():
            if q >= at:
                gone.update(reasoning(units[k], config.mask_delimiters))
        for kv in range(q + 1):
            mask[q, kv] = kv not in gone
    return Expected([Row(t, False) for t in range(n)], mask, units, start)


def visibility(case: MaskCase) -> Visibility:
    return compute_visibility(list(case.ids), case.specials, case.config, case.prefix)


def dense(vis: Visibility) -> np.ndarray:
    return vis.dense().numpy()


well_formed = mask_cases  # without ``mutate`` every case is well-formed (or a well-formed prefix)


# ----------------------------------------------------------------------------------------------
# 6. The dense mask (and the restart layout) equal the oracle, for every knob setting
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(600), **SETTINGS)
@given(case=well_formed())
def test_dense_mask_equals_oracle(case: MaskCase) -> None:
    expected = oracle_layout(case)
    vis = visibility(case)
    event(f"mode keep={case.config.keep_last_n} restart={case.config.restart}")
    event(f"units={len(expected.units)}")
    assert vis.tracking_from == expected.tracking_from
    assert len(vis) == len(expected.rows)
    assert vis.source.tolist() == [row.source for row in expected.rows]
    assert vis.position_ids.tolist() == [row.source for row in expected.rows]  # logical positions
    assert vis.token_ids.tolist() == [case.ids[row.source] for row in expected.rows]
    assert vis.output_rows.tolist() == [expected.row_of(t) for t in range(len(case.ids))]
    assert [(u.block_start, u.block_end, u.summary_start, u.summary_end) for u in vis.units] == [
        (u.bs, u.be, u.ss, u.se) for u in expected.units
    ]
    np.testing.assert_array_equal(dense(vis), expected.mask)


# ----------------------------------------------------------------------------------------------
# 1. Replaying the tracker like an engine keeps exactly the dense mask's row live
# ----------------------------------------------------------------------------------------------


def replay(case: MaskCase, vis: Visibility) -> None:
    mask = dense(vis)
    tracker = MementoTracker(case.specials, case.config, case.prefix)
    live: set[int] = set()
    row_of: dict[int, int] = {}
    next_row = 0
    for t, token in enumerate(case.ids):
        for ev in tracker.feed(token):
            assert ev.at == t
            for j in ev.evicted:  # every evicted token is live when it goes, and goes once
                assert row_of[j] in live, (t, j)
                live.remove(row_of[j])
            for j in ev.recompute:  # restart: re-prefill copies of the memento before token t
                r = next_row
                next_row += 1
                assert (vis.source[r], vis.position_ids[r], vis.token_ids[r]) == (j, j, case.ids[j])
                live.add(r)
                assert live == set(np.flatnonzero(mask[r]).tolist()), (t, "copy", j)
        r = next_row
        next_row += 1
        row_of[t] = r
        assert vis.output_rows[t] == r and vis.source[r] == t
        live.add(r)
        assert live == set(np.flatnonzero(mask[r]).tolist()), t
    assert next_row == len(vis)
    assert tuple(tracker.events) == vis.events
    assert tracker.position == len(case.ids)


@settings(max_examples=examples(600), **SETTINGS)
@given(case=well_formed())
def test_tracker_replay_matches_dense_mask(case: MaskCase) -> None:
    replay(case, visibility(case))


@settings(max_examples=examples(300), **SETTINGS)
@given(case=well_formed(), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_row_layout_fed_in_any_chunks_equals_the_whole_sequence(case: MaskCase, cuts: list[int]) -> None:
    """An engine feeds prompts in one chunk and outputs token by token: same rows, same decision.

    Along the way, ``take_dead`` (the KV an engine may free) hands back exactly the rows that no
    later row can see, each once: by the rule, those with ``invisible_from`` at or before the rows
    computed so far.
    """
    whole = visibility(case)
    layout = RowLayout(SequenceTracker(case.specials, case.config, case.prefix))
    bounds = sorted({0, len(case.ids), *(c for c in cuts if c < len(case.ids))})
    freed: list[int] = []
    for lo, hi in itertools.pairwise(bounds):
        layout.feed(list(case.ids[lo:hi]))
        computed = layout.num_rows  # as if every row so far had its KV computed
        freed += [row for run in layout.take_dead(computed) for row in run]
        invisible = layout.columns()[2]
        assert all(invisible[row] <= computed for row in freed)
    got = layout.visibility()
    for name in ("token_ids", "position_ids", "invisible_from", "source", "output_rows"):
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)
    assert got.events == whole.events and got.tracking_from == whole.tracking_from
    assert sorted(freed) == sorted(set(freed)), "a row was freed twice"
    final = len(whole)
    assert set(freed) | {r for run in layout.doomed for r in run} == set(np.flatnonzero(whole.invisible_from < NEVER))
    assert all(whole.invisible_from[r] > final for run in layout.doomed for r in run)


@settings(max_examples=examples(200), **SETTINGS)
@given(case=well_formed(), data=st.data())
def test_stopping_tracking_at_a_defect_keeps_what_was_decided(case: MaskCase, data: st.DataObject) -> None:
    """The lenient format-error policy: a sequence broken after position k is laid out as its first
    k tokens, then plain causal rows."""
    cut = data.draw(st.integers(min_value=0, max_value=len(case.ids)))
    broken = [*case.ids[:cut], case.specials.summary_end, case.specials.summary_end, *case.ids[cut:]]
    tracker = SequenceTracker(case.specials, case.config, case.prefix, stop_on_format_error=False)
    layout = RowLayout(tracker)
    layout.feed(broken)
    got = layout.visibility()
    if tracker.structure_error is None:  # not tracked there (before the assistant turn) or vanilla
        return
    head = compute_visibility(broken[: tracker.structure_error.position], case.specials, case.config, case.prefix)
    assert got.events == head.events
    np.testing.assert_array_equal(got.invisible_from[: len(head)], head.invisible_from)
    assert (got.invisible_from[len(head) :] == NEVER).all()
    assert len(got.output_rows) == len(broken)
    with pytest.raises(MementoFormatError):
        RowLayout(SequenceTracker(case.specials, case.config, case.prefix, stop_on_format_error=True)).feed(broken)


# ----------------------------------------------------------------------------------------------
# 2. keep_last_n = -1 is the causal mask
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(200), **SETTINGS)
@given(case=well_formed(modes=("vanilla",)))
def test_vanilla_is_causal(case: MaskCase) -> None:
    vis = visibility(case)
    n = len(case.ids)
    np.testing.assert_array_equal(dense(vis), np.tril(np.ones((n, n), dtype=bool)))
    assert vis.events == ()
    assert (vis.invisible_from == NEVER).all()


# ----------------------------------------------------------------------------------------------
# 3. Causal, and every row sees itself (single sequences incl. restart, batches incl. padding)
# ----------------------------------------------------------------------------------------------


def assert_causal_with_diagonal(mask: np.ndarray) -> None:
    assert mask.ndim == 2 and mask.shape[0] == mask.shape[1]
    assert not np.triu(mask, k=1).any(), "a row sees a later key"
    assert mask.diagonal().all(), "a row does not see itself"


@settings(max_examples=examples(300), **SETTINGS)
@given(case=well_formed(modes=("memento", "keep1", "keep2", "restart")))
def test_masks_are_causal_and_see_themselves(case: MaskCase) -> None:
    assert_causal_with_diagonal(dense(visibility(case)))


# ----------------------------------------------------------------------------------------------
# 4. A memento sees its own block; 5. nothing from the summary_end on does (keep 0)
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(300), **SETTINGS)
@given(case=well_formed(modes=("memento", "keep1", "keep2", "restart")))
def test_memento_sees_its_own_block(case: MaskCase) -> None:
    expected = oracle_layout(case)
    mask = dense(visibility(case))
    restart = case.config.restart
    for unit in expected.units:
        if unit.ss is None:
            continue
        last = unit.se - 1 if unit.se is not None else len(case.ids) - 1
        block = range(unit.bs, unit.be + 1)  # delimiters included: they only go later, if at all
        for q in range(unit.ss, last + 1):
            row = expected.row_of(q)  # the original memento row (restart: computed with the block)
            assert mask[row, [expected.row_of(kv) for kv in block]].all(), (q, unit)
            if restart:
                assert mask[row, [expected.row_of(kv) for kv in range(unit.bs, q + 1)]].all()


@settings(max_examples=examples(300), **SETTINGS)
@given(case=well_formed(modes=("memento", "restart")))
def test_nothing_sees_a_block_from_its_summary_end_on(case: MaskCase) -> None:
    case = dataclasses.replace(case, config=dataclasses.replace(case.config, keep_last_block_for_answer=False))
    expected = oracle_layout(case)
    vis = visibility(case)
    mask = dense(vis)
    for unit in expected.units:
        if unit.se is None:
            continue
        se_row = expected.row_of(unit.se)
        if case.config.restart:
            # from the first copy of the memento on, the block (delimiters included), the gap and
            # the original memento are gone
            first = se_row - (unit.se - unit.ss)
            assert vis.source[first:se_row].tolist() == list(range(unit.ss, unit.se))
            cols = [expected.row_of(kv) for kv in range(unit.bs, unit.se)]
        else:
            first = unit.se
            cols = list(reasoning(unit, case.config.mask_delimiters))
        assert not mask[first:, cols].any(), unit
        # the summary_end itself stays visible to every later row
        assert mask[se_row:, se_row].all()


# ----------------------------------------------------------------------------------------------
# 7. Batches equal per-sample masks; 3. also for padded batches; 8. mask_mod equals dense
# ----------------------------------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[MaskCase], str, int | None, int]:
    """One vocabulary, configuration and assistant prefix; 1-4 sequences of mixed lengths."""
    first = draw(well_formed())
    cases = [first]
    for _ in range(draw(st.integers(0, 3))):
        ids, _ = draw(masking_sequences(first.vocab, first.config.require_assistant_section, prefix=first.prefix))
        cases.append(MaskCase(ids=tuple(ids), vocab=first.vocab, config=first.config, prefix=first.prefix))
    side = draw(st.sampled_from(["left", "right"]))
    multiple = draw(st.sampled_from([None, 1, 8]))
    pad_id = draw(st.sampled_from([0, 99]))
    return cases, side, multiple, pad_id


def check_batch(cases: Sequence[MaskCase], batch, side: str, multiple: int | None, pad_id: int) -> None:
    items = [visibility(c) for c in cases]
    lengths = [len(v) for v in items]
    length = max(lengths)
    if multiple:
        length = -(-length // multiple) * multiple
    full = batch.dense().numpy()
    assert full.shape == (len(cases), 1, length, length)
    mod = batch.mask_mod()
    grid_b = torch.arange(len(cases))[:, None, None, None]
    grid_q = torch.arange(length)[None, None, :, None]
    grid_kv = torch.arange(length)[None, None, None, :]
    np.testing.assert_array_equal(mod(grid_b, torch.zeros_like(grid_b), grid_q, grid_kv).numpy(), full)
    additive = batch.additive().numpy()
    np.testing.assert_array_equal(additive == 0, full)
    assert (additive[~full] == torch.finfo(torch.float32).min).all()
    for b, (vis, n) in enumerate(zip(items, lengths, strict=True)):
        mask = full[b, 0]
        assert_causal_with_diagonal(mask)
        offset = length - n if side == "left" else 0
        real = slice(offset, offset + n)
        pad = np.r_[0:offset, offset + n : length]
        assert batch.offsets[b] == offset
        np.testing.assert_array_equal(mask[real, real], dense(vis))
        assert batch.input_ids[b, real].tolist() == vis.token_ids.tolist()
        assert batch.position_ids[b, real].tolist() == vis.position_ids.tolist()
        assert batch.attention_mask[b].tolist() == [int(offset <= i < offset + n) for i in range(length)]
        assert (batch.input_ids[b, pad] == pad_id).all()
        assert batch.output_rows[b].tolist() == (vis.output_rows + offset).tolist()
        assert not mask[real][:, pad].any(), "a real row sees padding"
        np.testing.assert_array_equal(mask[pad], np.eye(length, dtype=bool)[pad])  # padding sees only itself


@settings(max_examples=examples(300), **SETTINGS)
@given(spec=batches())
def test_batches_equal_per_sample_masks(spec) -> None:
    cases, side, multiple, pad_id = spec
    first = cases[0]
    batch = build_batch(
        [list(c.ids) for c in cases],
        first.specials,
        first.config,
        assistant_prefix=first.prefix,
        padding_side=side,
        pad_token_id=pad_id,
        pad_to_multiple_of=multiple,
    )
    check_batch(cases, batch, side, multiple, pad_id)
    again = collate_visibility(
        [visibility(c) for c in cases], padding_side=side, pad_token_id=pad_id, pad_to_multiple_of=multiple
    )
    for name in ("input_ids", "position_ids", "attention_mask", "invisible_from"):
        assert torch.equal(getattr(batch, name), getattr(again, name)), name


@settings(max_examples=examples(200), **SETTINGS)
@given(case=well_formed())
def test_mask_mod_equals_dense(case: MaskCase) -> None:
    vis = visibility(case)
    inv = torch.from_numpy(vis.invisible_from)[None]
    n = len(vis)
    mod = make_mask_mod(inv)
    q = torch.arange(n)[:, None]
    kv = torch.arange(n)[None, :]
    got = mod(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), q, kv)
    np.testing.assert_array_equal(got.numpy(), dense(vis))
    # pointwise, as FlexAttention's vmap evaluates it (scalar tensors)
    for qi, ki in [(n - 1, 0), (n // 2, n // 3), (n - 1, n - 1)] if n else []:
        scalar = mod(torch.tensor(0), torch.tensor(0), torch.tensor(qi), torch.tensor(ki))
        assert bool(scalar) == bool(dense(vis)[qi, ki])


# ----------------------------------------------------------------------------------------------
# 9. feed_many in random chunks == token by token == one call (incl. a split assistant prefix)
# ----------------------------------------------------------------------------------------------


def outcome_by_tokens(case: MaskCase):
    tracker = MementoTracker(case.specials, case.config, case.prefix)
    events = []
    for t, token in enumerate(case.ids):
        try:
            events += tracker.feed(token)
        except MementoFormatError as err:
            assert err.position == t
            return ("error", err.position)
    return ("ok", events, tracker.units, tracker.tracking_from, tracker.position, tracker.events)


def outcome_by_chunks(case: MaskCase, cuts: Sequence[int], single: Sequence[bool]):
    tracker = MementoTracker(case.specials, case.config, case.prefix)
    events = []
    bounds = [0, *cuts, len(case.ids)]
    try:
        for (lo, hi), one in zip(itertools.pairwise(bounds), single, strict=True):
            chunk = case.ids[lo:hi]
            if one and len(chunk) == 1:
                events += tracker.feed(chunk[0])
            else:
                events += tracker.feed_many(np.asarray(chunk, dtype=np.int64) if lo % 2 else list(chunk))
    except MementoFormatError as err:
        return ("error", err.position)
    return ("ok", events, tracker.units, tracker.tracking_from, tracker.position, tracker.events)


@settings(max_examples=examples(500), **SETTINGS)
@given(case=mask_cases(mutate=0.3), data=st.data())
def test_feed_many_chunks_equal_token_by_token(case: MaskCase, data) -> None:
    n = len(case.ids)
    cuts = set(data.draw(st.lists(st.integers(0, n), max_size=8)))
    start = None
    if case.config.require_assistant_section:
        with contextlib.suppress(Malformed):
            start, _ = masking_verdict(case.ids, case.vocab, case.config, case.prefix)
        if start is not None and len(case.prefix) > 1:
            cuts.add(start - data.draw(st.integers(1, len(case.prefix) - 1)))  # split the prefix
            event("assistant prefix split across chunks")
    cuts = sorted(cuts)
    single = data.draw(st.lists(st.booleans(), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    by_tokens = outcome_by_tokens(case)
    assert outcome_by_chunks(case, cuts, single) == by_tokens
    assert outcome_by_chunks(case, [], [False]) == by_tokens
    event(by_tokens[0])


# ----------------------------------------------------------------------------------------------
# 10. Malformed sequences raise MementoFormatError at the first defect; never a mask
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(700), **SETTINGS)
@given(case=mask_cases(mutate=1.0, truncate=False))
def test_malformed_sequences_raise_at_the_defect(case: MaskCase) -> None:
    try:
        expected = oracle_layout(case)
    except Malformed as defect:
        event(f"malformed: {defect.why.split(' in state')[0]}")
        with pytest.raises(MementoFormatError) as info:
            visibility(case)
        assert info.value.position == defect.position, (info.value, defect)
        assert info.value.reason
        with pytest.raises(MementoFormatError) as info:
            build_batch([list(case.ids)], case.specials, case.config, assistant_prefix=case.prefix)
        assert info.value.position == defect.position
        tracker = MementoTracker(case.specials, case.config, case.prefix)
        with pytest.raises(MementoFormatError) as info:
            for token in case.ids:
                tracker.feed(token)
        assert info.value.position == defect.position
        assert 0 <= defect.position < len(case.ids)
        return
    event("still well-formed (or a well-formed prefix)")
    np.testing.assert_array_equal(dense(visibility(case)), expected.mask)


# Concrete defects named in the contract, each raising at the offending token.
B, E, S, Z, T, U = 1, 2, 3, 4, 5, 6  # block_start, block_end, summary_start, summary_end, <think>, </think>
x = 9


@pytest.mark.parametrize(
    ("ids", "position"),
    [
        ([B, x, B], 2),  # nested block_start
        ([x, E], 1),  # block_end without an open block
        ([x, S], 1),  # summary_start without a closed block
        ([B, x, S], 2),  # summary_start inside a block
        ([B, x, E, x, Z], 4),  # summary_end without summary_start
        ([B, x, E, B], 3),  # a new block before the memento
        ([B, E], 1),  # empty block
        ([B, x, E, S, Z], 4),  # empty memento
        ([B, x, E, S, x, Z, U, x, B], 8),  # memento token after </think>
        ([B, x, U], 2),  # </think> inside a block
        ([B, x, E, S, x, U], 5),  # </think> inside a memento
    ],
)
def test_named_defects(ids: list[int], position: int) -> None:
    specials = SpecialTokenIds(B, E, S, Z, T, U)
    for config in (MaskConfig(keep_last_n=-1), MaskConfig(), MaskConfig(keep_last_n=0, restart=True)):
        with pytest.raises(MementoFormatError) as info:
            compute_visibility(ids, specials, config)
        assert info.value.position == position


@pytest.mark.parametrize(
    "ids",
    [
        [B, T, E, S, x, Z],  # a block holding only <think>: not empty (not adjacent delimiters)
        [B, x, T, E, S, x, Z],  # <think> inside a block is an ordinary token for masking
        [B, x, E, S, T, Z],  # ... and inside a memento
    ],
)
def test_think_start_is_an_ordinary_token_for_masking(ids: list[int]) -> None:
    vis = compute_visibility(ids, SpecialTokenIds(B, E, S, Z, T, U), MaskConfig())
    assert len(vis.units) == 1 and vis.units[0].summary_end == len(ids) - 1


def test_right_padding_rows_see_only_themselves() -> None:
    # Regression: with right padding the padding rows used to see every real token before them.
    batch = build_batch([[x, B, x, E, S, x, Z, x], [x, x]], SpecialTokenIds(B, E, S, Z, T, U), padding_side="right")
    mask = batch.dense()[1, 0].numpy()
    np.testing.assert_array_equal(mask[2:], np.eye(8, dtype=bool)[2:])
    np.testing.assert_array_equal(mask[:2, :2], np.tril(np.ones((2, 2), dtype=bool)))


@settings(**SETTINGS)
@given(config=mask_configs())
def test_mode_names_round_trip(config: MaskConfig) -> None:
    """Eval's mode names and the settings they stand for are one spelling, read both ways."""
    again = MaskConfig.from_mode(config.mode, require_assistant_section=config.require_assistant_section)
    assert again == config


@settings(**SETTINGS)
@given(config=mask_configs(), other=mask_configs())
def test_split_knobs_takes_the_knobs_and_leaves_the_rest(config: MaskConfig, other: MaskConfig) -> None:
    options = {**dataclasses.asdict(config), "kv_budget_tokens": 7}
    mask, rest = other.split_knobs(options)
    assert mask == config and rest == {"kv_budget_tokens": 7}
    assert other.split_knobs({"mask": config, "x": 1}) == (config, {"x": 1})
    assert config.changed_knobs(other) == {
        k: v for k, v in dataclasses.asdict(config).items() if v != getattr(other, k)
    }
    with pytest.raises(ValueError, match="either mask= or the knobs"):
        other.split_knobs({"mask": config, "keep_last_n": 0})
