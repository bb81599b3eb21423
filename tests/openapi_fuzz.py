"""Schemathesis against a running server's /openapi.json, run as a script in its own process.

``python tests/openapi_fuzz.py BASE_URL [--examples N] [--budget-s S]`` prints one JSON report on its
last line: operations, cases sent (by operation, generation mode and status) and every failure of the
checks (no 5xx; status codes, content types and bodies as the document declares; schema-violating
requests refused).

Why a process of its own: schemathesis patches Hypothesis globally when it builds strategies (its
buffer size, its example printer, its random registration), which would change every Hypothesis test
that ran after it in the same pytest worker. For the same reason its pytest plugin is disabled
(``-p no:schemathesis`` in pyproject.toml): loading the plugin applies those patches at start-up.

Each operation gets schemathesis' coverage cases (boundary values and every kind of invalid value,
positive and negative; unexpected methods included) and ``--examples`` random cases per generation
mode (coverage first for every operation, then random cases). Hypothesis is derandomised: the same
cases every run. Past ``--budget-s`` no more requests are sent (the report says how many cases were
left out).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import time
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


class Fuzzer:
    def __init__(self, base_url: str, budget_s: float) -> None:
        self.base_url = base_url
        self.deadline = time.monotonic() + budget_s
        self.session = requests.Session()
        self.cases: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.failures: dict[str, str] = {}  # one report per distinct failure
        self.left_out = 0

    def run(self, case: Any, how: str) -> None:
        if time.monotonic() > self.deadline:
            self.left_out += 1
            return
        label = case.operation.label
        self.cases[f"{label} {how}"] += 1
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=60)
        except Exception as exc:  # no answer at all: the worst failure
            self.failures.setdefault(f"{label}: {type(exc).__name__}", f"{exc} (body: {case.body!r:.500})")
            return
        self.statuses[f"{label} {response.status_code}"] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException as exc:  # FailureGroup is an exception group
            if not isinstance(exc, Exception):
                raise
            first = str(exc).strip().splitlines()
            key = f"{label}: {type(exc).__name__}: {' / '.join(line.strip() for line in first[:4])[:300]}"
            self.failures.setdefault(key, str(exc)[:4000])

    def coverage(self, schema: Any, operations: list[Any]) -> None:
        """Every operation's coverage cases, taken in turns: should the budget run out, each operation
        has had its share (the completions route's many fields would otherwise use it all up)."""
        streams = []
        for operation in operations:
            generation = schema.config.generation_for(operation=operation)
            streams.append(
                iter(schema.iter_coverage_cases(operation, generation_modes=list(MODES), generation_config=generation))
            )
        while streams:
            for stream in list(streams):
                case = next(stream, None)
                if case is None:
                    streams.remove(stream)
                    continue
                self.run(case, f"coverage-{case.meta.generation.mode.value if case.meta else '?'}")

    def fuzz(self, operation: Any, mode: GenerationMode, examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            self.run(case, f"fuzz-{mode.value}")

        with contextlib.suppress(Unsatisfiable):  # nothing to make invalid: no parameters, no body
            one()

    def report(self, operations: list[str], started: float) -> dict[str, Any]:
        return {
            "operations": operations,
            "cases": sum(self.cases.values()),
            "cases_by_kind": dict(sorted(self.cases.items())),
            "statuses": dict(sorted(self.statuses.items())),
            "failures": self.failures,
            "left_out": self.left_out,
            "seconds": round(time.monotonic() - started, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=60.0)
    args = parser.parse_args()
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{args.base_url}/openapi.json")
    fuzzer = Fuzzer(args.base_url, args.budget_s)
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzer.coverage(schema, operations)  # every operation's coverage cases first, should the budget run out
    for mode in MODES:
        for operation in operations:
            fuzzer.fuzz(operation, mode, args.examples)
    print(json.dumps(fuzzer.report([operation.label for operation in operations], started)))


if __name__ == "__main__":
    main()
