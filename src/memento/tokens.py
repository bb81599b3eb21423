"""Turning text into tokens for statistics and pictures: an HF tokenizer, or a regex stand-in.

Counting "tokens per block" needs a tokenizer. When the user names an HF tokenizer directory we
use it; otherwise :class:`RegexTokenizer`, a dependency-free stand-in that splits words, numbers
and punctuation (each with its leading whitespace) and keeps the special tokens whole. Its counts
are approximate and are labelled so wherever they are reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from memento.format import SPECIAL_TOKENS, THINK_END, THINK_START, SpecialTokenIds

_SPECIAL_ALT = "|".join(re.escape(tok) for tok in SPECIAL_TOKENS)
_PIECE_RE = re.compile(rf"(?:{_SPECIAL_ALT})|\s*(?!{_SPECIAL_ALT})(?:\w+|[^\w\s])|\s+")


class TextTokenizer(Protocol):
    """What the statistics and pictures need from a tokenizer."""

    name: str
    specials: SpecialTokenIds

    def encode(self, text: str) -> list[int]: ...

    def pieces(self, text: str) -> list[str]: ...

    def count(self, text: str) -> int: ...


@dataclass
class RegexTokenizer:
    """Approximate, deterministic, offline; ids are assigned on first sight (specials first)."""

    name: str = "regex (approximate)"
    vocab: dict[str, int] = field(default_factory=lambda: {t: i for i, t in enumerate(SPECIAL_TOKENS)})

    @property
    def specials(self) -> SpecialTokenIds:
        v = self.vocab
        return SpecialTokenIds(
            v["<|block_start|>"], v["<|block_end|>"], v["<|summary_start|>"], v["<|summary_end|>"],
            v[THINK_START], v[THINK_END],
        )  # fmt: skip

    def pieces(self, text: str) -> list[str]:
        """Pieces whose concatenation is ``text`` exactly."""
        return _PIECE_RE.findall(text)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pieces(text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.vocab)
            ids.append(self.vocab[piece])
        return ids

    def count(self, text: str) -> int:
        """Tokens in ``text``, not counting a trailing whitespace-only piece."""
        return sum(1 for piece in self.pieces(text) if piece.strip())


class HFTokenizer:
    """An HF tokenizer (loaded from a local directory) behind the same small interface."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        self.name = str(path)
        self.specials = SpecialTokenIds.from_tokenizer(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def pieces(self, text: str) -> list[str]:
        return [self._tok.decode([i]) for i in self.encode(text)]

    def count(self, text: str) -> int:
        return len(self.encode(text))


def load_tokenizer(path: str | Path | None) -> TextTokenizer:
    """The HF tokenizer at ``path``, or the regex stand-in when ``path`` is None."""
    if path is None:
        return RegexTokenizer()
    return HFTokenizer(path)
