"""The ``memento`` reasoning parser for vLLM's OpenAI server: ``<think> ... </think>`` split as the
embedded server splits it.

``memento serve --backend vllm`` starts vLLM's server with ``--reasoning-parser memento``
(:mod:`memento.vllm.plugin` registers the name, lazily, in every vLLM process). The split is
:func:`memento.serve.text.split_reasoning`'s (the thinking, blocks and mementos included, in
``reasoning``; the answer in ``content``; no tag at all: all answer), streams are split by the
embedded server's :class:`memento.serve.text.ReasoningStream`, and ``reasoning_tokens`` are counted
with :func:`memento.serve.text.reasoning_token_count`. vLLM's own ``deepseek_r1`` and ``qwen3``
parsers differ: they call an answer without tags reasoning, and keep the newlines around the tags.
The parser keeps the whole answer, so vLLM's tool-call parsers (``--tool-call-parser``) see none of
it. One case still differs from the embedded server: a chat prompt whose last think tag is
``</think>`` makes vLLM stream the whole answer as ``content``, unsplit.

A chat request that does not set ``skip_special_tokens`` gets ``false``: the memento tokens are
special tokens, and the think tags are where a tokenizer had to be given them, so vLLM's default
(``true``) would drop them from the text the split reads (the embedded server never drops them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.reasoning import ReasoningParser

from memento.serve.text import (
    THINK_END,
    THINK_START,
    ReasoningStream,
    reasoning_token_count,
    split_reasoning,
    think_token_ids,
)


class MementoReasoningParser(ReasoningParser):
    """``--reasoning-parser memento`` (see the module docstring)."""

    engine_based_streaming = True
    """Streams are parsed by the parser's own state (:class:`ReasoningStream`, the embedded server's),
    from the deltas alone, and flushed at the end (:meth:`finish_streaming`)."""

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, *args, **kwargs)
        self.think_ids = think_token_ids(tokenizer)
        self._stream = ReasoningStream()  # vLLM makes a parser per sample of a request

    @property
    def reasoning_start_str(self) -> str:
        return THINK_START

    @property
    def reasoning_end_str(self) -> str:
        return THINK_END

    def adjust_request(self, request: Any) -> Any:
        if "skip_special_tokens" not in request.model_fields_set:
            request.skip_special_tokens = False
        return request

    # -- token ids (vLLM's streaming state, structured outputs) -----------------------------------

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """Whether the last think tag in ``input_ids`` closes the thinking (vLLM asks this of the
        prompt, and its structured outputs ask it before they constrain the answer)."""
        if self.think_ids is None:
            return False
        start_id, end_id = self.think_ids
        for token in reversed(input_ids):
            if token == start_id:
                return False
            if token == end_id:
                return True
        return False

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Any) -> bool:
        return self.think_ids is not None and self.think_ids[1] in list(delta_ids)

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        if self.think_ids is None or self.think_ids[1] not in input_ids[:-1]:
            return []
        return input_ids[input_ids.index(self.think_ids[1]) + 1 :]

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        return reasoning_token_count(token_ids, self.think_ids)

    # -- text ----------------------------------------------------------------------------------

    def extract_reasoning(self, model_output: str, request: Any) -> tuple[str | None, str | None]:
        return split_reasoning(model_output)

    def extract_reasoning_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> DeltaMessage | None:
        return _delta(*self._stream.push(delta_text))

    def has_engine_confirmed_reasoning_end(self) -> bool:
        """Never: the whole stream goes through :attr:`_stream`, whose answer drops the newlines after
        ``</think>`` as the whole answer's split does (vLLM's pass-through after the end would not)."""
        return False

    def finish_streaming(self) -> DeltaMessage | None:
        """At the end of a stream: what was held back as a possible tag start."""
        return _delta(*self._stream.push("", final=True))


def _delta(reasoning: str, content: str) -> DeltaMessage | None:
    """The delta of a stream's step (only the parts it has, as the embedded server sends it)."""
    fields = {name: text for name, text in (("reasoning", reasoning), ("content", content)) if text}
    return DeltaMessage(**fields) if fields else None
