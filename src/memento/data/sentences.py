"""Stage 1 of the OpenMementos pipeline: structure-aware sentence splitting of a reasoning trace.

The splitter cuts a trace into sentence units that later stages score and group into blocks. It
works in two passes, both linear in the length of the trace:

1. **Cut.** Markup that must stay whole is found first and no cut is ever placed strictly inside
   it: fenced code (```` ``` ```` and ``~~~``), display math (``$$..$$``, ``\\[..\\]``,
   ``\\begin{env}..\\end{env}``), inline math (``$..$``, ``\\(..\\)``), inline code, markdown
   tables (runs of lines starting and ending with ``|``) and matched parentheses/brackets on one
   line. Cuts are then placed at paragraph breaks (blank lines), before block starts (fences,
   display math at a line start, table, list item, heading), after blocks that end a line, around
   standalone equation lines, and at sentence ends: ``.``, ``!`` or ``?`` (optionally followed by
   closing quotes/brackets), then whitespace, then an uppercase letter, a digit, a quote or a
   markup start. A single ``.`` is not a sentence end after an abbreviation (``e.g.``, ``Fig.``,
   ...) or after an enumeration number at a list start (``1. First``, ``Steps: 1. Do``). Decimals
   (``3.14``) never qualify because a sentence end needs whitespace after it.
2. **Merge**, following the MEMENTO paper and the release's splitter (microsoft/memento,
   ``data/pipeline/sentence_split.py``), in two steps:

   a. *Fragments*: a unit under ``min_tokens`` tokens merges into the previous unit (into the next
      one when it comes first), before the joins below, so a short label such as ``So:`` or
      ``Simplify:`` goes with the text before it and its colon then brings in what it introduces.
   b. *Joins*, in order of the text: a unit joins the group before it when

      - the previous unit ends in ``:`` (it introduces this one: a formula, a list, a sentence);
      - it starts with a continuation word (``Therefore``, ``Thus``, ``So``, ``Hence``, ``Then``
        followed by a comma or whitespace);
      - both are pure math (only display/inline math and equation lines): a run of math;
      - the previous unit is unfinished (its last character is not ``.``, ``!``, ``?``, ``:`` or
        ``;``, or it ends in ``...``) and this one is pure math, holds math as the previous one
        does, or starts with a lowercase letter on the next line (no blank line between): an
        equation line joins the sentence introducing it, the text after it goes on with it, and a
        derivation goes on until a line ends a sentence;
      - both hold math and the group joined with this unit has at most 30 (whitespace-separated)
        words: short steps of a computation join while the joined unit stays short;
      - both start a list item (``-``, ``*``, ``+``, ``1.``, ``1)``): a list stays together.

      A unit "holds math" when it has a math span, or outside code a relation, arrow or math sign
      (``=``, ``<``, ``→``, ``^``, ``√``, ``²``, ...), a TeX command, or arithmetic between numbers
      (``3/4``, ``2 * 8``).

   Merges only ever remove cuts, so fenced code, display math and inline math stay whole.

Offsets are exact: every cut sits on the first non-whitespace character of a unit, so the
whitespace between two sentences ends the preceding one, and the sentences are contiguous and
cover the input: ``"".join(s.text for s in split_sentences(t)) == t``.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Sentence", "sentence_texts", "split_sentences", "split_think"]


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence unit: ``text == trace[start:end]``."""

    text: str
    start: int
    end: int


# --- span kinds -------------------------------------------------------------------------------

_FENCE, _DISPLAY, _INLINE, _CODE = 0, 1, 2, 3
_MATH_KINDS = (_DISPLAY, _INLINE)

# Openers of protected markup. A cheap character scan finds candidates (one alternation searched
# over the whole text is several times slower), then the opener is matched there and its closer is
# searched separately.
_OPEN_CHAR = re.compile(r"[$\\`~]")
_OPEN_AT = re.compile(
    r"(?P<fence>`{3,}|~{3,})"
    r"|(?P<dd>\$\$)"
    r"|(?P<sq>\\\[)"
    r"|(?P<env>\\begin\{(?P<name>[^{}\n]{1,40})\})"
    r"|(?P<par>\\\()"
    r"|(?P<code>`[^`\n]+`)"
    r"|(?P<dollar>\$(?![\s$]))"
)
# Inline $..$ (pandoc's rule): no newline inside, no space before the closing $, no digit after it.
_DOLLAR_CLOSE = re.compile(r"(?:[^$\n\\]|\\.)*?(?<!\s)\$(?!\d)")
# A closing fence ends its line (``code```` closes too); an opener mid-line is backticks plus an info string.
_FENCE_CLOSE = {
    "`": re.compile(r"(`{3,})[ \t]*$", re.M),
    "~": re.compile(r"^[ \t]*(~{3,})[ \t]*$", re.M),
}
_INFO_STRING = re.compile(r"[ \t]*[\w+#.-]*[ \t]*")

_NONWS = re.compile(r"\S")
_BRACKET = re.compile(r"[()\[\]\n]")
_LIST = re.compile(r"(?:[-*+]|\d{1,3}[.)])[ \t]")
_HEADING = re.compile(r"#{1,6}(?:[ \t]|$)", re.M)
_TRAIL_OK = re.compile(r"[\s.,;:!?]*")  # what may follow display math for it to end its line

# A sentence end: terminal punctuation, optional closing quotes/brackets, then whitespace.
_SENT_END = re.compile(r"([.!?]+)[\"'”’)\]]*\s+")
_STARTERS = frozenset("\"'“‘«$\\`|#*>~-([")

# fmt: off
_ABBREVIATIONS = frozenset({
    "e.g", "i.e", "etc", "vs", "cf", "al", "approx", "dr", "mr", "mrs", "ms", "prof", "fig", "figs", "eq",
    "eqs", "sec", "ch", "resp", "viz", "ref", "thm", "lem",
})
# fmt: on

# Equation lines: every letter run is a one/two-letter variable (not a common English word) or a
# function name, and there is a relation or an operator with a digit.
_WORD = re.compile(r"\\[A-Za-z]+|[^\W\d_]+")
_LONG_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
# fmt: off
_FUNCS = frozenset({
    "sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh", "arcsin", "arccos", "arctan", "log", "ln",
    "lg", "exp", "sqrt", "mod", "max", "min", "lim", "sup", "inf", "gcd", "lcm", "det", "deg", "dim", "ker",
    "arg",
})
_STOP2 = frozenset({
    "so", "if", "is", "as", "at", "by", "to", "of", "in", "on", "or", "we", "it", "be", "an", "no", "do", "go",
    "me", "my", "up", "us", "he", "am",
})
# fmt: on
_RELATION = re.compile(r"[=<>≤≥≠≈≡⇒→⟹∈∝≅≃∼]")
_OPERATOR = re.compile(r"[+\-*/^×÷·]")
_DIGIT = re.compile(r"\d")
_PUNCT_ONLY = re.compile(r"[.,;:!?]+")

_CONTINUATION = re.compile(r"(?:Therefore|Thus|So|Hence|Then)(?:,|\s)")
_FINISHED = frozenset(".!?:;")  # a unit whose last character is one of these (but not "...") is finished
_MATH_STEP_WORDS = 30  # short steps of a computation join while the joined unit has at most this many words
# Math outside markup: a relation, an arrow, a math sign or a TeX command (``x = 1``, ``t^2``, ``√3``, ``t²``,
# ``\frac``), or arithmetic between numbers (``3/4``, ``2 * 8``, ``(16 - 4)``).
_MATH_SIGN = re.compile(r"[=<>≤≥≠≈≡⇒→⟹∈∝≅≃∼^√∛±×÷·∑∏∫²³]|\\[A-Za-z]|[\d)][ \t]*[-+*/][ \t]*[\d(]")


# --- pass 1: protected spans ------------------------------------------------------------------


def _find_spans(text: str) -> tuple[list[int], list[int], list[int]]:
    """Protected markup spans ``[start, end)`` (sorted, disjoint) and their kinds."""
    starts: list[int] = []
    ends: list[int] = []
    kinds: list[int] = []
    n = len(text)
    missing: set[str] = set()  # closers absent from the rest of the text: never search for them again

    def find_closer(closer: str, frm: int) -> int:
        """End of the first ``closer`` at or after ``frm``; -1 if none."""
        if closer in missing:
            return -1
        j = text.find(closer, frm)
        if j < 0:
            missing.add(closer)
            return -1
        return j + len(closer)

    pos = 0
    while True:
        c = _OPEN_CHAR.search(text, pos)
        if c is None:
            break
        i = c.start()
        m = _OPEN_AT.match(text, i)
        if m is None or (i > 0 and text[i - 1] == "\\" and text[i] == "$"):
            pos = i + 1
            continue
        group = m.lastgroup
        end = -1
        if group == "fence":
            start = i
            run = m.group()
            nl = text.find("\n", m.end())
            line_end = n if nl < 0 else nl
            line_start = text.rfind("\n", 0, i) + 1
            same_line = text.find(run, m.end(), line_end) if run[0] == "`" else -1
            if same_line >= 0:  # ```code``` on one line: inline code
                end, kind = same_line + len(run), _CODE
            elif text[line_start:i].strip(" \t") and not (
                run[0] == "`" and _INFO_STRING.fullmatch(text, m.end(), line_end)
            ):  # mid-line: a fence only as ``Code: ```python`` at the end of its line
                pos = m.end()
                continue
            else:
                kind = _FENCE
                closer = _FENCE_CLOSE[run[0]]
                cm = closer.search(text, line_end) if nl >= 0 else None
                while cm is not None and len(cm.group(1)) < len(run):
                    cm = closer.search(text, cm.end())
                end = n if cm is None else cm.end()  # an unclosed fence runs to the end
        else:
            start = m.start()
            kind = _DISPLAY
            if group == "dd":
                end = find_closer("$$", m.end())
            elif group == "sq":
                end = find_closer("\\]", m.end())
            elif group == "env":
                end = _env_end(text, m.group("name"), m.end(), find_closer)
            elif group == "par":
                kind = _INLINE
                end = find_closer("\\)", m.end())
            elif group == "code":
                kind, end = _CODE, m.end()
            else:  # dollar
                kind = _INLINE
                cm = _DOLLAR_CLOSE.match(text, m.end())
                end = -1 if cm is None else cm.end()
        if end < 0:  # unclosed: not a span
            pos = m.end()
            continue
        starts.append(start)
        ends.append(end)
        kinds.append(kind)
        pos = end if end > m.start() else m.start() + 1
    return starts, ends, kinds


def _env_end(text: str, name: str, pos: int, find_closer: Callable[[str, int], int]) -> int:
    """End of ``\\begin{name}`` whose body starts at ``pos`` (same-name nesting counted); -1 if unclosed."""
    begin, end = "\\begin{" + name + "}", "\\end{" + name + "}"
    depth = 1
    ee = find_closer(end, pos)
    while ee >= 0:
        ib = text.find(begin, pos, ee - len(end))
        if ib >= 0:  # a nested same-name environment opens before the next end
            depth += 1
            pos = ib + len(begin)
            continue
        depth -= 1
        pos = ee
        if depth == 0:
            return pos
        ee = find_closer(end, pos)
    return -1


def _paren_pairs(text: str, starts: list[int], ends: list[int]) -> list[tuple[int, int]]:
    """Matched ()/[] pairs on one line, outside markup (any closer closes any opener: ``[0, 1)``)."""
    pairs: list[tuple[int, int]] = []
    stack: list[int] = []
    k, nspans = 0, len(starts)
    for m in _BRACKET.finditer(text):
        i = m.start()
        while k < nspans and ends[k] <= i:
            k += 1
        if k < nspans and starts[k] <= i:
            continue
        c = text[i]
        if c == "\n":
            stack.clear()
        elif c == "(" or c == "[":
            stack.append(i)
        elif stack:
            pairs.append((stack.pop(), i + 1))
    return pairs


def _merge_intervals(intervals: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted, disjoint intervals (overlapping ones merged; touching ones kept apart)."""
    intervals.sort()
    bs: list[int] = []
    be: list[int] = []
    for s, e in intervals:
        if bs and s < be[-1]:
            if e > be[-1]:
                be[-1] = e
        else:
            bs.append(s)
            be.append(e)
    return bs, be


# --- math classification ----------------------------------------------------------------------


def _is_equation(line: str) -> bool:
    """Is this (stripped, markup-free) line an equation such as ``2x + 3 = 7`` or ``= 12``?"""
    for m in _WORD.finditer(line):
        w = m.group()
        if w[0] == "\\":
            continue
        lw = w.lower()
        if len(w) >= 3:
            if lw not in _FUNCS:
                return False
        elif len(w) == 2 and lw in _STOP2:
            return False
    return _RELATION.search(line) is not None or (
        _OPERATOR.search(line) is not None and _DIGIT.search(line) is not None
    )


def _pure_math(text: str, a: int, b: int, starts: list[int], ends: list[int], kinds: list[int]) -> bool:
    """Is ``text[a:b]`` only math: display/inline math spans and equation lines (no prose, code, list, table)?"""
    i = bisect_left(starts, a)
    # Fast path for prose: a word of 3+ letters outside markup that is not a function name.
    for k, m in enumerate(_LONG_WORD.finditer(text, a, b)):
        if k == 4:
            break
        w = m.start()
        j = bisect_left(starts, w + 1) - 1
        if (j < 0 or ends[j] <= w) and m.group().lower() not in _FUNCS:
            return False
    pieces: list[str] = []
    pos = a
    n_math = 0
    nspans = len(starts)
    while i < nspans and starts[i] < b:
        if kinds[i] not in _MATH_KINDS or ends[i] > b:
            return False
        pieces.append(text[pos : starts[i]])
        pieces.append(" ")
        pos = ends[i]
        n_math += 1
        i += 1
    pieces.append(text[pos:b])
    rest = "".join(pieces)
    for line in rest.split("\n"):
        s = line.strip()
        if not s or _PUNCT_ONLY.fullmatch(s):
            continue
        if _LIST.match(s) or s[0] == "|" or _HEADING.match(s) or not _is_equation(s):
            return False
        n_math += 1
    return n_math > 0


def _has_math(text: str, a: int, b: int, starts: list[int], ends: list[int], kinds: list[int]) -> bool:
    """Does ``text[a:b]`` hold any math: a math span, or a math sign or arithmetic outside code?"""
    i = bisect_left(starts, a)
    nspans = len(starts)
    j = i
    while j < nspans and starts[j] < b:
        if kinds[j] in _MATH_KINDS:
            return True
        j += 1
    pos = a
    while True:
        m = _MATH_SIGN.search(text, pos, b)
        if m is None:
            return False
        q = m.start()
        while i < nspans and ends[i] <= q:
            i += 1
        if i < nspans and starts[i] <= q:  # inside code: go on after it
            pos = ends[i]
            continue
        return True


# --- pass 1: cuts -----------------------------------------------------------------------------


def _is_abbreviation(text: str, p: int) -> bool:
    j = p
    while j > 0 and (text[j - 1].isalpha() or text[j - 1] == "."):
        j -= 1
    return text[j:p].strip(".").lower() in _ABBREVIATIONS


def _is_enumeration(text: str, p: int) -> bool:
    """Is the ``.`` at ``p`` an enumeration marker: a 1-3 digit number at a line start or after a sentence end/colon?"""
    j = p
    while j > 0 and text[j - 1].isdigit():
        j -= 1
    if not 1 <= p - j <= 3:
        return False
    k = j
    while k > 0 and text[k - 1] in " \t":
        k -= 1
    if k == 0 or text[k - 1] == "\n":
        return True
    return k < j and text[k - 1] in ".!?:;"


def _cuts(text: str, starts: list[int], ends: list[int], kinds: list[int]) -> list[int]:
    n = len(text)
    nspans = len(starts)
    cuts: list[int] = []
    add = cuts.append
    tables: list[tuple[int, int]] = []

    def after(i: int) -> None:  # cut at the first non-whitespace at or after i
        m = _NONWS.search(text, i)
        if m is not None:
            add(m.start())

    # Line structure.
    si = 0
    pos = 0
    blank_before = False
    table_start = table_end = -1
    while pos < n:
        nl = text.find("\n", pos)
        le = n if nl < 0 else nl
        while si < nspans and ends[si] <= pos:
            si += 1
        in_span = si < nspans and starts[si] < pos
        m = None if in_span else _NONWS.search(text, pos, le)
        is_table = m is not None and text[m.start()] == "|" and text[pos:le].rstrip().endswith("|")
        if table_start >= 0 and not is_table:
            tables.append((table_start, table_end))
            after(table_end)
            table_start = -1
        if in_span:  # the line starts inside a multi-line span: go to the line after the span's end
            e = ends[si]
            nl2 = text.find("\n", e)
            le2 = n if nl2 < 0 else nl2
            if kinds[si] == _FENCE or (kinds[si] == _DISPLAY and _TRAIL_OK.fullmatch(text, e, le2)):
                after(le2)
            pos = le2 + 1
            blank_before = False
            continue
        if m is None:
            blank_before = True
            pos = le + 1
            continue
        fn = m.start()
        if blank_before:
            add(fn)
            blank_before = False
        if is_table:
            if table_start < 0:
                table_start = fn
                add(fn)
            table_end = pos + len(text[pos:le].rstrip())
            pos = le + 1
            continue
        if si < nspans and starts[si] == fn and kinds[si] in (_FENCE, _DISPLAY):
            add(fn)
            e = ends[si]
            nl2 = text.find("\n", e)
            le2 = n if nl2 < 0 else nl2
            if kinds[si] == _FENCE or _TRAIL_OK.fullmatch(text, e, le2):
                after(le2)
            pos = le2 + 1
            continue
        if _LIST.match(text, fn) or _HEADING.match(text, fn):
            add(fn)
        elif _pure_math(text, fn, le, starts, ends, kinds):
            add(fn)
            after(le)
        pos = le + 1
    if table_start >= 0:
        tables.append((table_start, table_end))

    # Sentence ends.
    for m in _SENT_END.finditer(text):
        q = m.end()
        if q >= n:
            continue
        c = text[q]
        if not (c.isupper() or c.isdigit() or c in _STARTERS):
            continue
        if m.group(1) == ".":
            p = m.start()
            if _is_abbreviation(text, p) or _is_enumeration(text, p):
                continue
        add(q)

    # Never cut strictly inside markup, a table or a bracket pair; never before the first non-space.
    blocked = list(zip(starts, ends, strict=True))
    blocked.extend(tables)
    blocked.extend(_paren_pairs(text, starts, ends))
    bs, be = _merge_intervals(blocked)
    first = _NONWS.search(text)
    lo = n if first is None else first.start()
    out: list[int] = []
    last = -1
    for q in sorted(cuts):
        if q <= lo or q >= n or q == last:
            continue
        j = bisect_left(bs, q) - 1
        if j >= 0 and q < be[j]:
            continue
        out.append(q)
        last = q
    return out


# --- pass 2: merges ---------------------------------------------------------------------------


def _word_count(s: str) -> int:
    return len(s.split())


def _one_line(text: str, k: int, a: int) -> bool:
    """Is there no blank line between ``text[k]`` and ``text[a]``?"""
    return text.count("\n", k + 1, a) <= 1


def split_sentences(
    trace: str, *, min_tokens: int = 5, count_tokens: Callable[[str], int] | None = None
) -> list[Sentence]:
    """Split a reasoning trace into contiguous sentence units that cover it exactly.

    ``min_tokens``: units with fewer tokens (by ``count_tokens``; default: whitespace-separated
    words) merge into the previous unit, or into the next one when they come first.
    """
    if not trace:
        return []
    starts, ends, kinds = _find_spans(trace)
    bounds = [0, *_cuts(trace, starts, ends, kinds), len(trace)]

    # 1. Short fragments: into the previous unit, or into the next one when they come first. Units keep
    # their word counts (cuts follow whitespace, so the words of merged units add up).
    units: list[tuple[int, int, int]] = []
    pending = pending_words = -1  # a leading short run waiting for the next unit
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        piece = trace[a:b]
        words = _word_count(piece)
        if pending >= 0:
            a, words, pending = pending, words + pending_words, -1
            piece = trace[a:b]
        if (words if count_tokens is None else count_tokens(piece)) < min_tokens:
            if units:
                units[-1] = (units[-1][0], b, units[-1][2] + words)
            else:
                pending, pending_words = a, words
            continue
        units.append((a, b, words))
    if pending >= 0:  # everything was short: one unit
        units.append((pending, len(trace), pending_words))

    # 2. Joins: each unit joins the group before it when the two hold together (module docstring).
    merged: list[tuple[int, int]] = []
    colon = is_open = math = has_math = item = False  # what the previous unit was
    k = 0  # the previous unit's last non-whitespace character
    group_words = 0  # words in merged[-1]
    for a, b, words in units:
        cur_math = _pure_math(trace, a, b, starts, ends, kinds)
        cur_has_math = cur_math or _has_math(trace, a, b, starts, ends, kinds)
        cur_item = _LIST.match(trace, a) is not None
        if merged and (
            colon
            or _CONTINUATION.match(trace, a) is not None
            or (cur_math and math)
            or (is_open and (cur_math or (has_math and cur_has_math)))
            or (is_open and trace[a].islower() and _one_line(trace, k, a))
            or (has_math and cur_has_math and group_words + words <= _MATH_STEP_WORDS)
            or (cur_item and item)
        ):
            merged[-1] = (merged[-1][0], b)
            group_words += words
        else:
            merged.append((a, b))
            group_words = words
        k = b - 1
        while k > a and trace[k].isspace():
            k -= 1
        colon = trace[k] == ":"
        is_open = trace[k] not in _FINISHED or trace.endswith("...", a, k + 1)
        math, has_math, item = cur_math, cur_has_math, cur_item
    return [Sentence(trace[a:b], a, b) for a, b in merged]


def sentence_texts(trace: str, **kwargs) -> list[str]:
    """The texts of :func:`split_sentences` (same keyword arguments)."""
    return [s.text for s in split_sentences(trace, **kwargs)]


_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def split_think(cot: str) -> tuple[str, str, str]:
    """Split ``"<think> ... </think> answer"`` into ``(before, inside, after)``; they join back to ``cot``.

    ``before`` ends with ``<think>`` and ``after`` starts with ``</think>``; only ``inside`` is meant
    to be sentence-split. Without ``<think>`` the whole text is inside, except that a lone
    ``</think>`` (chat templates often prefill the opening tag) still closes it; with ``<think>``
    but no ``</think>``, inside runs to the end.
    """
    i = cot.find(_THINK_OPEN)
    if i < 0:
        j = cot.find(_THINK_CLOSE)
        return ("", cot, "") if j < 0 else ("", cot[:j], cot[j:])
    body = i + len(_THINK_OPEN)
    j = cot.find(_THINK_CLOSE, body)
    if j < 0:
        return cot[:body], cot[body:], ""
    return cot[:body], cot[body:j], cot[j:]
