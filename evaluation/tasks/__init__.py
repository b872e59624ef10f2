"""Task registry. A task module in this package defines a `Task` subclass and decorates it with
`@register`; modules are discovered automatically, so adding a benchmark is adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from evaluation.tasks.base import EvalContext, LanguageModel, Task, TaskResult, TaskSkipped, accuracy

_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a registered task needs a name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} registered twice ({_REGISTRY[cls.name].__qualname__}, "
                         f"{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available_tasks() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """A fresh task object by name; raises a ValueError listing the known names."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"eval.tasks: unknown task {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]()


__all__ = ["EvalContext", "LanguageModel", "Task", "TaskResult", "TaskSkipped", "accuracy", "available_tasks",
           "get_task", "register"]
