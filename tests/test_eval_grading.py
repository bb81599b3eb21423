"""Grading: answer extraction, exact / choice / math (math-verify 0.9) grades, and the math child's timeout.

The math cases pin what math-verify 0.9.0 really does (through our wrapping of golds and bare answers),
including its surprises, so an upgrade that changes a verdict shows up here.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Iterator

import pytest

from memento.eval.grading import (
    GRADERS,
    Grade,
    Grader,
    answer_text,
    extract_choice,
    grade_choice,
    grade_exact,
    grade_math_inline,
    math_key,
    normalize_exact,
)


@pytest.fixture(scope="module")
def math_grader() -> Iterator[Grader]:
    with Grader("math", timeout=10.0) as grader:
        yield grader


def _child_pid(grader: Grader) -> int | None:
    return None if grader._process is None else grader._process.pid


# --------------------------------------------------------------------------------------------------
# answer_text


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think> a b c </think> 42<|im_end|>", "42"),
        ("<think> a </think>\n\n  The answer is 3.\n<|im_end|>", "The answer is 3."),
        ("<think> a </think> 7 \n", "7"),  # truncated: no <|im_end|>, runs to the end
        ("<think> a </think> x </think> y <|im_end|>", "y"),  # the last </think> counts
        ("<think> a </think>B<|im_end|> junk<|im_end|>", "B"),  # up to the first <|im_end|> after it
        ("<think> a </think><|im_end|>", ""),  # finished thinking, empty answer
        ("<think> a </think>", ""),
        ("<think> still thinking ... 42<|im_end|>", None),  # never closed the think section
        ("42", None),
        ("", None),
    ],
)
def test_answer_text(completion: str, expected: str | None) -> None:
    assert answer_text(completion) == expected


# --------------------------------------------------------------------------------------------------
# exact


def test_normalize_exact_collapses_whitespace_and_keeps_case() -> None:
    assert normalize_exact("  The \n\t Answer   is  X ") == "The Answer is X"
    assert normalize_exact("") == ""


def test_grade_exact() -> None:
    assert grade_exact(" 1   2\n3 ", "1 2 3")
    assert not grade_exact("abc", "ABC")
    assert not grade_exact("12", "1 2")
    assert not grade_exact(None, "x")


# --------------------------------------------------------------------------------------------------
# choice


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("**B**", "B"),
        ("Answer: B", "B"),
        ("\\boxed{B}", "B"),
        ("$\\boxed{\\text{(C)}}$", "C"),
        ("The correct option is (D).", "D"),
        ("All of them are Blue", None),  # letters inside words do not count
        ("A2 and B7 and xC", None),
        ("b", None),  # lower case does not count (the article "a")
        ("", None),
        (None, None),
        ("(A) looks tempting, but the answer is (C)", "C"),  # the last letter wins
        ("The answer is B. A is wrong because ...", "A"),  # ... even when it is not the choice
        ("J", "J"),
        ("K", None),  # not among the default letters A-J
    ],
)
def test_extract_choice(answer: str | None, letter: str | None) -> None:
    assert extract_choice(answer) == letter


def test_extract_choice_pronoun_i_counts_unless_letters_exclude_it() -> None:
    # I is one of the default letters A-J, so the pronoun counts; GPQA-style A-D grading excludes it.
    assert extract_choice("B, I think") == "I"
    assert extract_choice("B, I think", letters="ABCD") == "B"


def test_grade_choice() -> None:
    assert grade_choice("The answer is (B).", "B")
    assert grade_choice("**B**", "(B)")
    assert grade_choice("B", " (b) ")
    assert not grade_choice("C", "B")
    assert not grade_choice("All", "A")
    assert not grade_choice(None, "B")
    with pytest.raises(ValueError, match="one letter"):
        grade_choice("B", "BC")
    with pytest.raises(ValueError, match="one letter"):
        grade_choice("B", "")


# --------------------------------------------------------------------------------------------------
# math

MATH_TRUE = [
    # (gold, answer)
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "$\\boxed{\\frac{1}{2}}$"),
    ("0.75", "\\boxed{\\dfrac{3}{4}}"),
    ("[1, 2)", "$[1,2)$"),
    ("[1,2)", "[1, 2)"),  # a bare answer is wrapped like a gold
    # math-verify 0.9 strips units in LaTeX (\text{ cm}, \mathrm{cm}, and even a bare "cm").
    ("10", "$10\\text{ cm}$"),
    ("10", "10 cm"),
    ("10", "10cm"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),  # different keys (see below), equal grades
    ("3", "The answer is $\\boxed{3}$."),
    ("3", "So the answer is 3."),
    ("3", "3.0"),
    ("3", "x = 3"),  # an assignment to a variable counts as its value
    ("\\frac{1}{2}", "The answer is 0.5."),
    ("\\{1, 2\\}", "$\\{2, 1\\}$"),
    # Surprising but real: floats are compared rounded to 6 decimals, so 0.333333 is 1/3 (0.33 is not).
    ("1/3", "0.333333"),
    ("\\pi", "3.14159265"),
]

MATH_FALSE = [
    ("[1,2)", "[1,2]"),
    ("[1,2)", "$[1,2]$"),
    ("1/3", "0.33"),
    ("2", "3"),
    ("2", "2\\sqrt{3}"),  # parsed as-is this bare answer would read as the number 2
    ("3", "3\\pi"),
    ("2", "2xy"),
    ("2", ""),
    # A prose answer is parsed as-is, and math-verify's number extraction reads only the 2 of an
    # interval written without $...$: a real false negative for prose intervals.
    ("[1,2)", "The interval is [1, 2)."),
]


@pytest.mark.parametrize(("gold", "answer"), MATH_TRUE)
def test_math_equivalent(math_grader: Grader, gold: str, answer: str) -> None:
    grade = math_grader.grade(answer, gold)
    assert grade == Grade(correct=True, key=math_key(answer))
    assert grade_math_inline(answer, gold)


@pytest.mark.parametrize(("gold", "answer"), MATH_FALSE)
def test_math_not_equivalent(math_grader: Grader, gold: str, answer: str) -> None:
    grade = math_grader.grade(answer, gold)
    assert grade == Grade(correct=False, key=math_key(answer))
    assert not grade_math_inline(answer, gold)


def test_math_none_answer_is_wrong_without_a_child() -> None:
    grader = Grader("math")
    assert grader.grade(None, "3") == Grade(correct=False, key=None)
    assert grader._process is None  # nothing to parse: no child started
    assert not grade_math_inline(None, "3")


@pytest.mark.parametrize(
    ("answers", "key"),
    [
        # Floats are made exact, so decimals group with fractions.
        (["0.5", "\\frac{1}{2}", "$\\frac12$", "1/2", "The answer is 0.5.", "$\\boxed{0.5}$"], "1/2"),
        (["0.75", "\\dfrac{3}{4}", "$\\boxed{\\frac{3}{4}}$"], "3/4"),
        (["3", "3.0", "$3$", "The answer is 3."], "3"),
        (["\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"], "sqrt(2)/2"),
        (["[1, 2)", "$[1,2)$"], "Interval.Ropen(1, 2)"),
        (["10cm", "$10\\text{ cm}$"], "10"),
    ],
)
def test_math_key_groups_equivalent_forms(answers: list[str], key: str) -> None:
    assert [math_key(a) for a in answers] == [key] * len(answers)


def test_math_key_where_it_does_not_group() -> None:
    # Expressions keep their parsed form: expanded and factored polynomials differ, and an
    # assignment keeps its variable although it grades the same as the bare value.
    assert math_key("x^2+2x+1") == "x**2 + 2*x + 1"
    assert math_key("(x+1)^2") == "(x + 1)**2"
    assert math_key("$x=3$") == "Eq(x, 3)"
    # math-verify parses without evaluating, so 1/sqrt(2) is not brought to sympy's sqrt(2)/2.
    assert math_key("\\frac{1}{\\sqrt{2}}") == "1/sqrt(2)"
    # math-verify keeps 1/3 exact but not 0.333333 (its digits, made exact): equal grades, two keys.
    assert math_key("1/3") == "1/3"
    assert math_key("0.333333") == "333333/1000000"


def test_math_key_without_a_parse_and_without_an_answer() -> None:
    assert math_key("I  don't\nknow") == "I don't know"  # nothing parses: the normalised text
    assert math_key(None) is None
    assert math_key("") is None  # a blank answer does not vote
    assert math_key("  \n") is None


# --------------------------------------------------------------------------------------------------
# Grader


def test_grader_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"'fuzzy'.*\('exact', 'choice', 'math'\)"):
        Grader("fuzzy")
    for timeout in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="timeout"):
            Grader("math", timeout=timeout)
    with pytest.raises(ValueError, match="math function"):
        Grader("math", _math_fn="nope")
    assert GRADERS == ("exact", "choice", "math")


def test_exact_grader_keys() -> None:
    with Grader("exact") as grader:
        assert grader.grade(" 12  apples ", "12 apples") == Grade(correct=True, key="12 apples")
        assert grader.grade("13", "12") == Grade(correct=False, key="13")
        assert grader.grade(None, "12") == Grade(correct=False, key=None)
        assert grader.grade("  ", "12") == Grade(correct=False, key=None)  # blank: no vote


def test_choice_grader_keys() -> None:
    with Grader("choice") as grader:
        assert grader.grade("I'd say (B).", "(B)") == Grade(correct=True, key="B")
        assert grader.grade("**C**", "B") == Grade(correct=False, key="C")
        assert grader.grade("All of them", "A") == Grade(correct=False, key=None)
        assert grader.grade(None, "A") == Grade(correct=False, key=None)


def test_grade_many(math_grader: Grader) -> None:
    grades = math_grader.grade_many(["$\\frac{1}{2}$", "0.4", None], ["0.5", "0.5", "0.5"])
    assert [(g.correct, g.key) for g in grades] == [(True, "1/2"), (False, "2/5"), (False, None)]
    with pytest.raises(ValueError, match="2 answers but 1 gold"):
        math_grader.grade_many(["1", "2"], ["1"])


def test_timeout_kills_the_child_and_the_next_grade_restarts_it() -> None:
    with Grader("math", timeout=1.0, _math_fn="hook_for_tests") as grader:
        assert grader.grade("3", "3") == Grade(correct=True, key="3")  # startup is not billed to an answer
        first = _child_pid(grader)
        start = time.monotonic()
        assert grader.grade("sleep:60", "3") == Grade(correct=False, key=None, timed_out=True)
        assert 1.0 <= time.monotonic() - start < 5.0
        assert grader._process is None  # killed
        assert grader.grade("$\\boxed{3}$", "3") == Grade(correct=True, key="3")
        assert _child_pid(grader) not in (None, first)


def test_exception_and_child_death_grade_wrong_with_error() -> None:
    with Grader("math", timeout=10.0, _math_fn="hook_for_tests") as grader:
        assert grader.grade("raise:boom", "3") == Grade(correct=False, key=None, error="RuntimeError: boom")
        pid = _child_pid(grader)
        assert grader.grade("3", "3").correct  # an exception does not cost the child
        assert _child_pid(grader) == pid
        died = grader.grade("exit:3", "3")
        assert (died.correct, died.key, died.timed_out) == (False, None, False)
        assert died.error == "math grading child died (exit code 3)"
        assert grader.grade("3", "3") == Grade(correct=True, key="3")
        assert _child_pid(grader) not in (None, pid)


def test_closed_grader_raises_and_stops_its_child() -> None:
    grader = Grader("math", timeout=10.0)
    assert grader.grade("1/2", "0.5").correct
    pid = _child_pid(grader)
    with grader:
        pass  # __exit__ closes
    assert grader.closed
    assert pid not in [p.pid for p in multiprocessing.active_children()]
    with pytest.raises(RuntimeError, match="closed"):
        grader.grade("1/2", "0.5")
    grader.close()  # idempotent
    exact = Grader("exact")
    exact.close()
    with pytest.raises(RuntimeError, match="closed"):
        exact.grade("1", "1")
