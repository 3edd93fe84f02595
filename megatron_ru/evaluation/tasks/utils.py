"""Loaders and prompt builders of the bundled Russian tasks (offline: the JSON lines sit next to the YAML)."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_choice(**kwargs):  # noqa: ARG001 - lm-eval passes the task's metadata
    return _load("ru_choice.jsonl")


def load_yesno(**kwargs):  # noqa: ARG001
    return _load("ru_yesno.jsonl")


def load_answer(**kwargs):  # noqa: ARG001
    return _load("ru_answer.jsonl")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def choice_text(doc) -> str:
    """PARus style: the premise, then "потому что" (cause) or ", поэтому" (effect)."""
    premise = doc["premise"].rstrip(".")
    return premise + (" потому что" if doc["question"] == "cause" else ", поэтому")


def choice_options(doc) -> list:
    return [_lower_first(doc["choice1"]), _lower_first(doc["choice2"])]
