"""Grade a model's answer against a gold answer: exactly, as a multiple-choice letter, or as math.

memento models answer as ``<think> ... </think>ANSWER<|im_end|>``; :func:`answer_text` cuts out
ANSWER and a :class:`Grader` compares it with the gold answer in one of three ways (:data:`GRADERS`):

- ``exact``: equal after whitespace normalisation (synthetic tasks with one right string);
- ``choice``: the last standalone choice letter, as the paper grades GPQA;
- ``math``: math-verify's symbolic / numeric equivalence (MATH, AIME, ...).

Every grade also carries a ``key``: what majority voting groups answers by (``None``: no vote).

math-verify enforces its own timeouts with ``signal.alarm``, which only works in the main thread, and
some inputs make sympy run for minutes. So we always switch its timeouts off and run math grading in a
child process that is killed when one answer takes longer than the grader's timeout.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

GRADERS = ("exact", "choice", "math")

THINK_END = "</think>"
IM_END = "<|im_end|>"

# Strings that already tell math-verify where the math is; a gold (or bare answer) without one is wrapped as $...$.
_MATH_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")
# \text{...}-like groups (units, words typeset as math) do not make an answer prose.
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
# Two or more letters, not a LaTeX command name and not right after a digit (``2xy``, ``10cm``): a word,
# so the answer is prose.
_WORD = re.compile(r"(?<![\\A-Za-z0-9])[A-Za-z]{2,}")

# How long a fresh math child may take to import math-verify (sympy) before we give up on it.
_STARTUP_TIMEOUT = 120.0
# How long close() waits for the child to exit on its own before killing it.
_STOP_GRACE = 2.0


# --------------------------------------------------------------------------------------------------
# Answer extraction


def answer_text(completion: str) -> str | None:
    """The answer part of a completion: the text after the last ``</think>``, up to ``<|im_end|>``, stripped.

    Without ``<|im_end|>`` (a truncated answer) it runs to the end. None when there is no ``</think>``
    at all: the model never finished thinking, so it gave no answer (unlike ``""``, an empty answer
    after a finished think section).
    """
    end = completion.rfind(THINK_END)
    if end < 0:
        return None
    answer = completion[end + len(THINK_END) :]
    stop = answer.find(IM_END)
    if stop >= 0:
        answer = answer[:stop]
    return answer.strip()


def _votes(answer: str | None) -> bool:
    """Whether an answer votes at all: a missing or blank answer has nothing to group by."""
    return answer is not None and answer.strip() != ""


# --------------------------------------------------------------------------------------------------
# exact


def normalize_exact(text: str) -> str:
    """Strip and collapse internal whitespace runs to one space; case is kept (it can matter)."""
    return " ".join(text.split())


def grade_exact(answer: str | None, gold: str) -> bool:
    """Equal after :func:`normalize_exact`; a missing answer is wrong."""
    return answer is not None and normalize_exact(answer) == normalize_exact(gold)


# --------------------------------------------------------------------------------------------------
# choice


@lru_cache(maxsize=16)
def _choice_pattern(letters: str) -> re.Pattern[str]:
    # Standalone: no word character (letter, digit, underscore) on either side, so the A of "All" or
    # "A2" does not count while "(B)", "B)", "**B**", "Answer: B" and "\boxed{B}" do.
    return re.compile(rf"(?<!\w)([{re.escape(letters)}])(?!\w)")


def extract_choice(answer: str | None, letters: str = "ABCDEFGHIJ") -> str | None:
    """The last standalone choice letter, as the paper grades GPQA (the last A-D letter).

    Accepts forms like ``B``, ``(B)``, ``B)``, ``**B**``, ``Answer: B``, ``\\boxed{B}``; a letter inside
    a word (the A in "All") does not count. Only upper-case letters count: a lower-case "a" is far more
    often the article than a choice. The last letter wins, so an answer that names a letter after its
    choice ("B. A is wrong because ...") is read as that later letter, as in the paper's grading.
    """
    if answer is None:
        return None
    found = _choice_pattern(letters).findall(answer)
    return found[-1] if found else None


def _gold_letter(gold: str) -> str:
    """The gold choice: ``"B"`` or ``"(B)"`` (any case); anything else is a task-set error."""
    letter = gold.strip().strip("()").strip().upper()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"a choice gold answer must be one letter such as 'B' or '(B)', got {gold!r}")
    return letter


def grade_choice(answer: str | None, gold: str) -> bool:
    """The answer's last standalone letter (:func:`extract_choice`) equals the gold letter."""
    return extract_choice(answer) == _gold_letter(gold)


# --------------------------------------------------------------------------------------------------
# math (math-verify; import it lazily, it pulls in sympy)


def _has_math_delimiters(text: str) -> bool:
    return any(d in text for d in _MATH_DELIMITERS)


def _wrap_gold(gold: str) -> str:
    """Golds such as ``1/2``, ``3`` or ``[1, 2)`` carry no delimiters: math-verify reads them as LaTeX in ``$...$``."""
    return gold if _has_math_delimiters(gold) else f"${gold}$"


def _is_bare_math(answer: str) -> bool:
    """An answer with no delimiters and no words: a bare expression such as ``\\frac{\\sqrt{2}}{2}`` or ``[1, 2)``.

    Parsed as-is, math-verify reads such answers badly: bare LaTeX mostly yields nothing, and
    ``2\\sqrt{3}``, ``3\\pi``, ``2xy`` or ``[1, 2)`` yield just the number 2 or 3 (a wrong *match* against
    gold 2 or 3). Wrapped as ``$...$`` like a gold they parse right (math-verify drops units: ``$10cm$`` is 10).
    """
    return not _has_math_delimiters(answer) and not _WORD.search(_TEXT_GROUP.sub("", answer))


def _parse_gold(gold: str) -> list[Any]:
    from math_verify import parse

    return parse(_wrap_gold(gold), parsing_timeout=None)


def _parse_answer(answer: str) -> list[Any]:
    """math-verify's parse of an answer: a bare expression wrapped as ``$...$`` (:func:`_is_bare_math`), prose as-is."""
    from math_verify import parse

    return parse(f"${answer}$" if _is_bare_math(answer) else answer, parsing_timeout=None)


def _key_from_parsed(parsed: list[Any], answer: str) -> str | None:
    """The first parsed result as a string, floats made exact (``0.5`` -> ``1/2``) so they group with fractions."""
    if not _votes(answer):
        return None
    if not parsed:
        return normalize_exact(answer)
    first = parsed[0]
    import sympy

    if isinstance(first, sympy.Float):
        # str() of a sympy Float is its shortest exact decimal (15 digits): Rational of that is exact,
        # where Rational(first) would give the binary fraction (0.1 -> 3602879701896397/36028797018963968).
        first = sympy.Rational(str(first))
    return str(first)


def math_key(answer: str | None) -> str | None:
    """A canonical string for majority voting: the first math-verify parse result as a string.

    Falls back to :func:`normalize_exact` when nothing parses; None for a missing or blank answer
    (it does not vote). Floats are made exact, so ``0.5``, ``1/2`` and ``\\frac{1}{2}`` share the key
    ``1/2``; other equivalent forms (``\\sqrt{2}/2`` vs ``\\frac{1}{\\sqrt{2}}``) may still differ.
    Runs math-verify without a timeout: only call it in a process you can kill.
    """
    if answer is None:
        return None
    return _key_from_parsed(_parse_answer(answer), answer)


def grade_math_inline(answer: str | None, gold: str) -> bool:
    """math-verify with the gold parsed first: ``verify(parse(gold), parse(answer))``, both timeouts disabled.

    Only call this in a process you can kill (a :class:`Grader` does): without its signal-based
    timeouts math-verify can run for minutes on a hostile answer. Gold strings without ``$`` or
    ``\\boxed`` are wrapped as ``$gold$`` so plain ``1/2`` or ``3`` golds parse; bare-expression
    answers are wrapped the same way (:func:`_is_bare_math`), prose answers are parsed as-is.
    """
    return _grade_math(answer, gold)[0]


def _grade_math(answer: str | None, gold: str) -> tuple[bool, str | None]:
    """(correct, key) from one parse of the answer: what the child process computes per answer."""
    if answer is None:
        return False, None
    from math_verify import verify

    parsed = _parse_answer(answer)
    correct = bool(verify(_parse_gold(gold), parsed, timeout_seconds=None))
    return correct, _key_from_parsed(parsed, answer)


def _hook_for_tests(answer: str | None, gold: str) -> tuple[bool, str | None]:
    """Test stand-in for :func:`_grade_math`: ``sleep:S`` sleeps S seconds, ``raise:MSG`` raises,
    ``exit:N`` kills the child with exit code N; anything else is graded normally."""
    if answer is not None:
        command, _, arg = answer.partition(":")
        if command == "sleep":
            time.sleep(float(arg))
            return False, None
        if command == "raise":
            raise RuntimeError(arg)
        if command == "exit":
            os._exit(int(arg))
    return _grade_math(answer, gold)


# The functions a math child can run, by name: only a name crosses the process boundary.
_MATH_FUNCTIONS: dict[str, Callable[[str | None, str], tuple[bool, str | None]]] = {
    "grade": _grade_math,
    "hook_for_tests": _hook_for_tests,
}


def _math_worker(conn: Connection, fn_name: str) -> None:
    """The math child's entry point (module level: 'spawn' pickles it by reference).

    Imports math-verify, says ``("ready", None)``, then answers each ``(answer, gold)`` with
    ``("ok", (correct, key))`` or ``("error", message)`` until it reads None or the pipe closes.
    """
    # Ctrl-C goes to the whole process group: let the parent decide, it kills us in close().
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn = _MATH_FUNCTIONS[fn_name]
        import math_verify  # noqa: F401  (import before "ready": startup is not billed to an answer)

        # Its "timeout is disabled" warning is expected here: the parent is our timeout.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        answer, gold = request
        try:
            reply: tuple[str, Any] = ("ok", fn(answer, gold))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


# --------------------------------------------------------------------------------------------------
# Grader


@dataclass
class Grade:
    """One answer's grade.

    ``key`` is what majority voting groups by: :func:`normalize_exact` of the answer for ``exact``, the
    letter for ``choice``, :func:`math_key` for ``math``; None when the answer does not vote (missing or
    blank, no choice letter, or math grading timed out or failed).
    """

    correct: bool
    key: str | None
    timed_out: bool = False
    error: str | None = None


class Grader:
    """Grades answers with a per-answer timeout.

    ``exact`` and ``choice`` run in-process (a regex at most). ``math`` runs in one long-lived child
    process (multiprocessing 'spawn' context, started lazily on the first math grade, so a fork never
    copies a model or CUDA state) fed through a Pipe. If an answer takes longer than ``timeout`` seconds
    the child is killed (and a fresh one started on the next call) and the answer is graded wrong with
    ``timed_out=True``. An exception in math-verify, or the child dying, grades the answer wrong with
    ``error`` set. The child's startup (importing sympy) is not counted against ``timeout``.

    Usable as a context manager; :meth:`close` stops the child. A closed grader raises RuntimeError on
    :meth:`grade` instead of quietly starting a new child: use after close is a bug in the caller.
    Not thread-safe: one grader per thread. As with any 'spawn' child, a script that grades math must
    keep its top-level code under ``if __name__ == "__main__":`` (the child re-imports the main module).

    ``_math_fn`` names the function the child runs (a key of ``_MATH_FUNCTIONS``); tests use
    ``"hook_for_tests"`` to make the child sleep, raise or die.
    """

    def __init__(self, kind: str = "exact", timeout: float = 5.0, *, _math_fn: str = "grade") -> None:
        if kind not in GRADERS:
            raise ValueError(f"unknown grader kind {kind!r}; expected one of {GRADERS}")
        if not timeout > 0:  # also rejects NaN
            raise ValueError(f"grader timeout must be > 0 seconds, got {timeout}")
        if _math_fn not in _MATH_FUNCTIONS:
            raise ValueError(f"unknown math function {_math_fn!r}; expected one of {tuple(_MATH_FUNCTIONS)}")
        self.kind = kind
        self.timeout = float(timeout)
        self._math_fn = _math_fn
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False

    def __enter__(self) -> Grader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def grade(self, completion_answer: str | None, gold: str) -> Grade:
        """Grade one answer (the text :func:`answer_text` extracted; None: the model gave none)."""
        if self._closed:
            raise RuntimeError("this Grader is closed; make a new one")
        if self.kind == "exact":
            key = normalize_exact(completion_answer) if _votes(completion_answer) else None
            return Grade(correct=grade_exact(completion_answer, gold), key=key)
        if self.kind == "choice":
            letter = extract_choice(completion_answer)
            return Grade(correct=letter is not None and letter == _gold_letter(gold), key=letter)
        return self._grade_math(completion_answer, gold)

    def grade_many(self, answers: list[str | None], golds: list[str]) -> list[Grade]:
        """:meth:`grade` for each answer and its gold, in order."""
        if len(answers) != len(golds):
            raise ValueError(f"{len(answers)} answers but {len(golds)} gold answers")
        return [self.grade(answer, gold) for answer, gold in zip(answers, golds, strict=True)]

    def close(self) -> None:
        """Stop the math child (if any); idempotent."""
        self._stop_child(kill=False)
        self._closed = True

    # -- the math child ---------------------------------------------------------------------------

    def _grade_math(self, answer: str | None, gold: str) -> Grade:
        if answer is None:  # nothing to parse: no need to bother the child
            return Grade(correct=False, key=None)
        conn = self._send((answer, gold))
        if not conn.poll(self.timeout):
            self._stop_child(kill=True)
            return Grade(correct=False, key=None, timed_out=True)
        try:
            status, payload = conn.recv()
        except (EOFError, OSError):
            code = None
            if self._process is not None:
                self._process.join(_STOP_GRACE)  # EOF comes before the exit is reaped
                code = self._process.exitcode
            self._stop_child(kill=True)
            return Grade(correct=False, key=None, error=f"math grading child died (exit code {code})")
        if status == "error":
            return Grade(correct=False, key=None, error=payload)
        correct, key = payload
        return Grade(correct=bool(correct), key=key)

    def _send(self, request: tuple[str, str]) -> Connection:
        """Send a request to the child, starting one if there is none or the last one died meanwhile."""
        conn = self._ensure_child()
        try:
            conn.send(request)
        except OSError:  # died since its last answer (is_alive() raced with it): one fresh child, once
            self._stop_child(kill=True)
            conn = self._ensure_child()
            conn.send(request)
        return conn

    def _ensure_child(self) -> Connection:
        if self._process is not None and self._conn is not None and self._process.is_alive():
            return self._conn
        self._stop_child(kill=True)
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        process = context.Process(
            target=_math_worker, args=(child_conn, self._math_fn), name="memento-math-grader", daemon=True
        )
        process.start()
        child_conn.close()  # our copy: without it a dead child would never read as EOF
        self._process, self._conn = process, parent_conn
        failure = self._wait_ready(parent_conn)
        if failure is not None:
            self._stop_child(kill=True)
            raise RuntimeError(f"the math grading child failed to start: {failure}")
        return parent_conn

    @staticmethod
    def _wait_ready(conn: Connection) -> str | None:
        """None once the child says it is ready, else why it is not."""
        if not conn.poll(_STARTUP_TIMEOUT):
            return f"not ready after {_STARTUP_TIMEOUT:.0f} s"
        try:
            status, payload = conn.recv()
        except (EOFError, OSError):
            return "it exited during startup"
        return None if status == "ready" else str(payload)

    def _stop_child(self, *, kill: bool) -> None:
        """Stop the child: ask it to exit (kill=False) or kill it outright (a stuck grade)."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            if not kill:
                with contextlib.suppress(OSError):
                    conn.send(None)
            conn.close()
        if process is not None:
            if not kill:
                process.join(_STOP_GRACE)
            if process.is_alive():
                process.kill()
            process.join()
            process.close()
