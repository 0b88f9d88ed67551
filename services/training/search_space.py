"""What a recipe search may vary, and its bounds: the request's `search` object, validated per task.

A run's request may carry `search: {trials, max_seconds, space, pruner, keep_winner}`. The space is the task's
default ranges (`DEFAULT_SPACES`: learning rate, epochs, sequence length, batch size and regularisation) with
the request's `space` laid over them: a parameter given `{"low", "high", "log"}` or `{"choices"}` is searched
there, one given `null` is left out (the run's own value stays). Every bound must itself be a valid
hyper-parameter value for the task (`HyperparametersSchema`), so no trial can ask for a recipe the run API
would refuse. Nothing here imports optuna or torch: the API process validates requests with it.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError

from services.training.schemas import IMAGE, TEXT, HyperparametersSchema, SearchRequestSchema

TRIAL_TASK = "training.trial"
"""The Celery task that runs one trial (queued by name: the API process never imports optuna's trials)."""

INTEGER_PARAMETERS = ("epochs", "max_length")
DEFAULT_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    TEXT: {
        "learning_rate": {"low": 1e-5, "high": 2e-4, "log": True},
        "epochs": {"low": 2, "high": 6},
        "max_length": {"low": 32, "high": 128},
        "batch_size": {"choices": [16, 32]},
        "weight_decay": {"low": 1e-4, "high": 0.1, "log": True},
        "dropout": {"low": 0.0, "high": 0.3},
    },
    IMAGE: {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "epochs": {"low": 4, "high": 12},
        "batch_size": {"choices": [32, 64]},
        "weight_decay": {"low": 1e-4, "high": 0.1, "log": True},
        "label_smoothing": {"low": 0.0, "high": 0.2},
    },
}
SEARCHABLE = {task: tuple(space) for task, space in DEFAULT_SPACES.items()}
"""The parameters a search may vary, per task (a space override may narrow them, not add others)."""


def resolve_search(task_type: str, raw: dict[str, Any] | None, *, launch: str) -> dict[str, Any] | None:
    """The search's complete settings, or None without one. Raises ValidationError naming each bad field."""
    if raw is None:
        return None
    if task_type not in DEFAULT_SPACES:
        raise ValidationError(f"no search space for task type {task_type!r}")
    errors: dict[str, Any] = dict(SearchRequestSchema().validate(raw))
    if errors:
        raise ValidationError(errors)
    raw = SearchRequestSchema().load(raw)
    if launch != "queue":
        errors["launch"] = ["a search runs its trials on the training queue's workers: launch must be queue"]
    space = {name: _normalised(name, bounds) for name, bounds in DEFAULT_SPACES[task_type].items()}
    for name, override in (raw.get("space") or {}).items():
        if name not in SEARCHABLE[task_type]:
            errors[f"space.{name}"] = [f"not searchable for {task_type}; choose among {list(SEARCHABLE[task_type])}"]
        elif override is None:
            space.pop(name)
        else:
            problems = _range_problems(name, override)
            if problems:
                errors[f"space.{name}"] = problems
            else:
                space[name] = _normalised(name, override)
    if not space and not errors:
        errors["space"] = ["every parameter was left out: a search needs at least one to vary"]
    if errors:
        raise ValidationError(errors)
    return {
        "trials": raw["trials"],
        "max_seconds": raw["max_seconds"],
        "pruner": raw["pruner"],
        "keep_winner": raw["keep_winner"],
        "space": space,
    }


def _range_problems(name: str, override: Any) -> list[str]:
    if not isinstance(override, dict):
        return ['expected {"low", "high"} (and optionally "log"), {"choices": [...]}, or null to leave it out']
    if "choices" in override:
        choices = override["choices"]
        if set(override) != {"choices"} or not isinstance(choices, list) or not choices:
            return ['"choices" must be a non-empty list, alone']
        return [problem for value in choices for problem in _value_problems(name, value)]
    if set(override) - {"low", "high", "log"} or "low" not in override or "high" not in override:
        return ['expected "low" and "high" (and optionally "log")']
    low, high, log = override["low"], override["high"], override.get("log", False)
    problems = _value_problems(name, low) + _value_problems(name, high)
    if problems:
        return problems
    if not isinstance(log, bool):
        return ['"log" must be true or false']
    if low > high:
        return [f"low ({low}) is above high ({high})"]
    if log and low <= 0:
        return [f"a log scale needs low > 0, not {low}"]
    return []


def _value_problems(name: str, value: Any) -> list[str]:
    integer = name in INTEGER_PARAMETERS or name == "batch_size"
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        return [f"{value!r} is not {'an integer' if integer else 'a number'}"]
    problems = HyperparametersSchema().validate({name: int(value) if integer else value})
    return [f"{value}: {message}" for message in problems.get(name, [])]


def _normalised(name: str, override: dict[str, Any]) -> dict[str, Any]:
    integer = name in INTEGER_PARAMETERS or name == "batch_size"
    if "choices" in override:
        return {"choices": [int(v) if integer else v for v in override["choices"]]}
    cast = int if integer else float
    return {"low": cast(override["low"]), "high": cast(override["high"]), "log": bool(override.get("log", False))}
