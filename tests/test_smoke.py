"""The package imports and a canonical trace renders and parses back exactly."""

from memento.format import MementoTrace, parse_response, render_response


def test_canonical_trace_round_trips() -> None:
    trace = MementoTrace.new("2+3+4?", [(" 2+3=5 ", " s=5 "), (" 5+4=9 ", " s=9 ")], "9")
    text = render_response(trace)
    assert text.startswith("<think>\n<|block_start|> 2+3=5 <|block_end|><|summary_start|> s=5 <|summary_end|>\n")
    assert text.endswith("</think>\n9")
    assert parse_response(text, prompt="2+3+4?") == trace
    assert trace.final_answer == "9"
