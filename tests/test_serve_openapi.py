"""The OpenAPI document tells the truth (issue 16): every status each route answers, every error with
OpenAI's error object, no 422; request schemas that refuse what the server refuses; and schemathesis,
run against a live server, finds no 5xx and no answer the document does not describe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema_rs
import pytest

from helpers import running_tiny_server
from memento.serve.protocol import error_body
from test_serve import wait_for_empty_pool

# A short context keeps every generation short, whatever n and max_tokens the fuzzer picks.
CONFIG = {"kv_budget_tokens": 512, "max_num_seqs": 16, "keep_last_n": 0, "max_model_len": 96}
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
ERRORS = {"400", "404", "429", "500", "503"}
ERROR_SCHEMA = {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
PROMETHEUS = "text/plain; version=0.0.4"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server():
    with running_tiny_server(**CONFIG) as served:
        yield served


@pytest.fixture(scope="module")
def doc(server) -> dict:
    running, _ = server
    return httpx.get(f"{running.base_url}/openapi.json").json()


def validator(doc: dict, name: str):
    """A JSON-schema validator for one of the document's component schemas."""
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


# -- the document ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_generation_routes_declare_every_status_they_answer(doc, path) -> None:
    responses = doc["paths"][path]["post"]["responses"]
    assert set(responses) == {"200", *ERRORS}
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    events = responses["200"]["content"]["text/event-stream"]["itemSchema"]
    assert events["required"] == ["data"]
    for status in ERRORS:
        assert responses[status]["content"] == {"application/json": ERROR_SCHEMA}, status
        assert responses[status]["description"]


def test_no_422_and_no_validation_error_schemas(doc) -> None:
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])
    assert "HTTPValidationError" not in json.dumps(doc)


def test_health_metrics_and_models_declare_their_answers(doc, server) -> None:
    paths = doc["paths"]
    assert set(paths) == {"/health", "/metrics", "/v1/models", *GENERATION_ROUTES}
    assert set(paths["/health"]["get"]["responses"]) == {"200", "503"}
    assert paths["/health"]["get"]["responses"]["503"]["content"] == {"application/json": ERROR_SCHEMA}
    assert set(paths["/metrics"]["get"]["responses"]) == {"200"}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {PROMETHEUS}
    assert set(paths["/v1/models"]["get"]["responses"]) == {"200"}
    running, _ = server
    metrics = httpx.get(f"{running.base_url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"] == PROMETHEUS  # exactly, no charset
    assert "memento_kv_pool_capacity_tokens 512.0" in metrics.text
    models = httpx.get(f"{running.base_url}/v1/models").json()
    assert validator(doc, "ModelList").is_valid(models)
    assert validator(doc, "HealthStatus").is_valid(httpx.get(f"{running.base_url}/health").json())


def test_the_error_schema_is_openais_error_object(doc, server) -> None:
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == set(detail["properties"]) == {"message", "type", "param", "code"}
    errors = validator(doc, "ErrorResponse")
    assert errors.is_valid(error_body("why", "invalid_request_error", "prompt", 400))
    assert errors.is_valid(error_body("engine failed", "server_error"))  # a stream's error event
    running, _ = server
    unknown = httpx.post(f"{running.base_url}/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert unknown.status_code == 404 and errors.is_valid(unknown.json())
    unreadable = httpx.post(f"{running.base_url}/v1/completions", content=b"\xff\xfe{", headers=JSON)
    assert unreadable.status_code == 400 and errors.is_valid(unreadable.json())  # was FastAPI's {"detail": ...}


# -- request schemas refuse what the server refuses -------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": [""]}, "prompt is empty"),
        ({"prompt": [3, -1]}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt is empty"),
        ({"prompt": [[5], []]}, "prompt is empty"),
        ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
        ({"prompt": "x", "stop": ""}, "stop"),
        ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
        ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias is not supported"),
        ({"prompt": "x", "best_of": 0}, "best_of"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
        ({"prompt": "x", "temperature": False}, "temperature"),
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "presence_penalty": False}, "presence_penalty"),
        ({"prompt": "x", "echo": 0}, "echo"),
    ],
)
def test_what_the_schema_refuses_is_a_400_that_says_why(doc, server, body, needle) -> None:
    assert not validator(doc, "CompletionRequest").is_valid(body)
    running, _ = server
    response = httpx.post(f"{running.base_url}/v1/completions", json={"max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x"},
        {"prompt": [5, 6]},
        {"prompt": ["x"]},  # OpenAI's batch form, a batch of one
        {"prompt": [[5, 6]]},
        {"prompt": ["x", "y z"], "n": 2},  # a batch: choices i * n + j
        {"prompt": [[5, 6], [7]]},
        {"prompt": "x", "echo": True, "logprobs": 1},
        {"prompt": "x", "response_format": {"type": "text"}, "repetition_penalty": 1.0, "min_p": 0},
        {"prompt": "x", "n": 2.0},  # an integer, as JSON Schema reads it
        {"prompt": "x", "seed": 2**63 - 1, "n": 3},
        {"prompt": "x", "seed": -(2**63)},
        {"prompt": "x", "logit_bias": {}, "presence_penalty": 0.0, "echo": False, "best_of": 1},
        {"prompt": "x", "temperature": 0, "stop": ["a", "b"], "stop_token_ids": [7]},
    ],
)
def test_what_the_schema_accepts_the_server_serves(doc, server, body) -> None:
    assert validator(doc, "CompletionRequest").is_valid(body)
    running, _ = server
    response = httpx.post(f"{running.base_url}/v1/completions", json={"max_tokens": 2, **body}, timeout=60)
    assert response.status_code == 200, response.text
    assert validator(doc, "CompletionResponse").is_valid(response.json())


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"prompt": [5, 105]}, "out of the vocabulary"),
        ("/v1/completions", {"prompt": "x" * 200}, "context"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "echo with logprobs"),
        ("/v1/completions", {"prompt": ["x", "y" * 200]}, "context"),
    ],
    ids=["best_of", "stream_options", "vocabulary", "context", "top_logprobs", "echo-stream", "batch-context"],
)
def test_rules_no_schema_can_state_are_the_documented_400(doc, server, path, body, needle) -> None:
    """Rules across fields and rules of the model served: schema-valid, refused with a 400 that says why."""
    name = "CompletionRequest" if path == "/v1/completions" else "ChatCompletionRequest"
    assert validator(doc, name).is_valid(body)
    running, _ = server
    response = httpx.post(f"{running.base_url}{path}", json={"max_tokens": 2, **body})
    assert response.status_code == 400 and needle in response.json()["error"]["message"]
    assert "400" in doc["paths"][path]["post"]["responses"]


# -- schemathesis ------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_nothing_undocumented(server) -> None:
    """Coverage cases (boundaries, every kind of invalid value) and random cases, positive and negative,
    for every operation: no 5xx, statuses, content types and bodies as declared, invalid data refused.

    Schemathesis runs in a process of its own (tests/openapi_fuzz.py says why)."""
    running, engine = server
    fuzz = Path(__file__).with_name("openapi_fuzz.py")
    command = [sys.executable, str(fuzz), running.base_url, "--examples", "250", "--budget-s", "60"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nschemathesis: {len(report['operations'])} operations, {report['cases']} cases in {report['seconds']} s")
    print(f"  failures: {len(report['failures'])}, left out (budget): {report['left_out']}")
    for key, count in report["cases_by_kind"].items():
        print(f"  cases {key}: {count}")
    for key, count in report["statuses"].items():
        print(f"  status {key}: {count}")
    assert not report["failures"], "\n\n".join(report["failures"].values())
    assert len(report["operations"]) == 5
    statuses = {key: count for key, count in report["statuses"].items()}
    assert not [key for key in statuses if int(key.rsplit(" ", 1)[1]) >= 500]
    for path in GENERATION_ROUTES:  # the fuzzer got through to the engine, and was refused too
        assert statuses.get(f"POST {path} 200", 0) > 20 and statuses.get(f"POST {path} 400", 0) > 20
    assert httpx.get(f"{running.base_url}/health").json() == {"status": "ok"}
    wait_for_empty_pool(engine, timeout=30)
