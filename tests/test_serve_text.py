"""The server's text rules: final text, streamed deltas that never need taking back, reasoning split."""

from __future__ import annotations

import pytest

from memento.engine import SamplingParams
from memento.serve.text import (
    IncrementalText,
    ReasoningStream,
    final_text,
    reasoning_token_count,
    special_ids,
    split_reasoning,
    think_token_ids,
)
from memento.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_final_text_drops_the_eos_and_cuts_at_stop_strings(tok) -> None:
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens = [*ids(tok, "abc STOP def"), eos]
    assert final_text(tok, tokens, "eos", None, SamplingParams()) == "abc STOP def"
    assert final_text(tok, tokens[:-1], "length", None, SamplingParams()) == "abc STOP def"
    params = SamplingParams(stop=["STOP"])
    assert final_text(tok, tokens[:-1], "stop", "STOP", params) == "abc "
    keep = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    assert final_text(tok, tokens[:-1], "stop", "STOP", keep) == "abc STOP"
    by_id = SamplingParams(stop_token_ids=[eos])
    assert final_text(tok, tokens, "stop", eos, by_id) == "abc STOP def"


def test_streamed_deltas_hold_back_a_possible_stop_string(tok) -> None:
    params = SamplingParams(stop=["XYZ"])
    stream = IncrementalText(tok, params)
    text = "abXYQ cdXYZ ef"
    out = []
    for n in range(1, len(text) + 1):
        out.append(stream.delta(ids(tok, text[:n]), eos_token_ids=set()))
    # "XY" is held until "Q" shows it is not the stop string; nothing from "XYZ" on is ever sent.
    assert out[2] == "" and out[3] == "" and out[4] == "XYQ"
    assert "".join(out) == "abXYQ cd"
    assert stream.finish("abXYQ cd") == ""


def test_streamed_deltas_join_to_the_final_text(tok) -> None:
    params = SamplingParams()
    stream = IncrementalText(tok, params)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens = [*ids(tok, "<think>\nx=1<|block_end|></think>\n42"), eos]
    parts = [stream.delta(tokens[: i + 1], {eos}) for i in range(len(tokens))]
    final = final_text(tok, tokens, "eos", None, params)
    assert "".join(parts) + stream.finish(final) == final


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        ("<think>\nsteps\n</think>\n42", "steps", "42"),
        ("<think>\nstill thinking", "still thinking", None),
        ("plain answer", None, "plain answer"),
        ("steps</think>\n7", "steps", "7"),  # the opening tag was in the prompt
        ("<think>\n</think>\n\n5", None, "5"),
    ],
)
def test_split_reasoning(text, reasoning, answer) -> None:
    assert split_reasoning(text) == (reasoning, answer)


def test_reasoning_stream_matches_the_split_of_the_whole_text() -> None:
    text = "<think>\n<|block_start|>a b<|block_end|><|summary_start|>m<|summary_end|>\n</think>\n42"
    for step in (1, 2, 3, 7):
        stream = ReasoningStream()
        reasoning, answer = "", ""
        pieces = [text[i : i + step] for i in range(0, len(text), step)]
        for k, piece in enumerate(pieces):
            r, a = stream.push(piece, final=k == len(pieces) - 1)
            reasoning += r
            answer += a
        assert (reasoning, answer) == split_reasoning(text)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("<think>\nsteps\n</think>\n42", 7),  # one character per token; the newlines are tokens too
        ("<think>\nstill thinking", 15),
        ("plain answer", 0),
        ("steps</think>\n7", 5),  # the opening tag was in the prompt
        ("<think></think>5", 0),
        ("a<think>b</think>c<think>d", 1),
    ],
)
def test_reasoning_tokens_are_those_the_split_calls_reasoning(tok, text, count) -> None:
    think = think_token_ids(tok)
    assert think == tuple(tok.convert_tokens_to_ids(["<think>", "</think>"]))
    assert reasoning_token_count(ids(tok, text), think) == count
    assert reasoning_token_count(ids(tok, text), None) == 0  # tags that are not single tokens: no count


def test_skipping_special_tokens_keeps_the_think_tags_for_the_chat_split(tok) -> None:
    text = "<think>\n<|block_start|>a1 b2<|block_end|><|summary_start|>m3<|summary_end|>\n</think>\nANSWER 7<|im_end|>"
    token_ids = ids(tok, text)
    params = SamplingParams()
    chat_skip = special_ids(tok, keep_think_tags=True)
    final = final_text(tok, token_ids, "length", None, params, chat_skip)
    assert split_reasoning(final) == ("a1 b2m3", "ANSWER 7")
    streamed = IncrementalText(tok, params, chat_skip)
    pieces = [streamed.delta(token_ids[: i + 1], {tok.eos_token_id}) for i in range(len(token_ids))]
    assert "".join(pieces) + streamed.finish(final) == final
    # completions drop the think tags too; without skipping nothing is dropped
    assert final_text(tok, token_ids, "length", None, params, special_ids(tok, keep_think_tags=False)) == (
        "\na1 b2m3\n\nANSWER 7"
    )
    assert final_text(tok, token_ids, "length", None, params) == text
