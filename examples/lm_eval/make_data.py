"""Turn memento records (problem / response / answer JSONL) into the lm-eval tasks' data file.

    python examples/lm_eval/make_data.py runs/demo/data/validation.jsonl runs/demo/memento-model \
        --out examples/lm_eval/stream_sum.jsonl --limit 30

Each line gets what the two tasks in this folder read:

* ``prompt``: the problem in the model's chat template, up to the assistant's opening (the
  generation task, ``memento_gen``: the model thinks, closes ``</think>`` and answers);
* ``context``: the prompt and the record's own memento trace up to ``</think>`` (the multiple-choice
  task, ``memento_mc``: the answer digit is scored after a trace whose closed blocks the server
  evicts, as it would after generating them);
* ``answer``, ``choices`` (the digits 0-9) and ``gold`` (the answer's index; records whose answer is
  not one digit get no multiple-choice entry: ``gold`` is -1 and the task skips them).

The chat template is the model's own (its tokenizer's), so the prompts are token for token what
``memento eval`` feeds the same model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

THINK_END = "</think>"
DIGITS = [str(d) for d in range(10)]


def lm_eval_record(tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
    """One data line for the tasks, from a memento record (``problem``, ``response``, ``answer``)."""
    messages = [{"role": "user", "content": record["problem"]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    response = record["response"]
    end = response.rfind(THINK_END)
    if end < 0:
        raise ValueError(f"record {record.get('uid', '?')}: the response has no {THINK_END}")
    context = prompt + response[: end + len(THINK_END)] + "\n"
    answer = str(record["answer"]).strip()
    return {
        "uid": record.get("uid"),
        "prompt": prompt,
        "context": context,
        "answer": answer,
        "choices": DIGITS,
        "gold": DIGITS.index(answer) if answer in DIGITS else -1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, help="JSONL with problem, response and answer fields")
    parser.add_argument("model", help="the model directory (its tokenizer's chat template is used)")
    parser.add_argument("--out", type=Path, default=Path("examples/lm_eval/stream_sum.jsonl"))
    parser.add_argument("--limit", type=int, default=30, help="the first N records (0: all)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lines = args.records.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if args.limit:
        records = records[: args.limit]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for record in records:
            out.write(json.dumps(lm_eval_record(tokenizer, record)) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
