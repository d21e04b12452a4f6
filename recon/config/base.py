"""The schema's building blocks: ``ConfigError``, the strict ``Section`` base, and the checks
that components (operators, guidances, integrators, timers, baselines) share."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """An invalid configuration file, value or override; the message names the field."""


BUILD_COMPONENTS: ContextVar[bool] = ContextVar("build_components", default=True)
"""False while ``fields_only``: components are checked by name, not imported and built."""


@contextmanager
def fields_only():
    """Validate fields, names and ranges only: no component is imported or trial-built (so
    neither torch nor sigpy is imported). ``validate_config`` runs this pass first."""
    token = BUILD_COMPONENTS.set(False)
    try:
        yield
    finally:
        BUILD_COMPONENTS.reset(token)


def check_name(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
    return name


def named(value: Any) -> Any:
    """Allow the short form ``heun`` for ``{name: heun}``."""
    return {"name": value} if isinstance(value, str) else value


def named_list(value: Any) -> Any:
    """A list of components from one item or a list, each in short form or not."""
    if isinstance(value, str | dict):
        value = [value]
    return [named(o) for o in value] if isinstance(value, list) else value


def check_params(kind: str, name: str, cls: type, params: Mapping[str, Any],
                  reserved: tuple[str, ...] = ()) -> None:
    """Unknown keyword arguments of ``cls`` -> error listing the accepted ones; a value of
    another type than the argument's annotation says (``true`` for a number: ``float(True)``
    would make it 1; ``text`` for a number) -> error naming the argument."""
    if inspect.isclass(cls) and cls.__init__ is object.__init__:
        accepted: list[str] = []
        sig = None
    else:
        try:
            sig = inspect.signature(cls.__init__ if inspect.isclass(cls) else cls)
        except (TypeError, ValueError):  # builtins without a signature: nothing to check
            return
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return
        accepted = [n for n, p in sig.parameters.items()
                    if n != "self" and n not in reserved and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {kind} {name!r}; accepted: "
                         f"{accepted or 'none'}")
    for key, value in params.items():
        expected = _expected(value, str(sig.parameters[key].annotation))
        if expected:
            raise ValueError(f"{key} of {kind} {name!r} must be {expected}, got {value!r}")


_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a name",
          "None": "null"}


def _expected(value: Any, annotation: str) -> str | None:
    """What an argument annotated ``annotation`` (a string: the components' modules postpone
    their annotations) takes, when ``value`` is not of it; None when it fits or the annotation
    is not made of ``_KINDS``."""
    allowed = [part.strip() for part in annotation.split("|")]
    if not set(allowed) <= set(_KINDS):
        return None
    if value is None:
        fits = "None" in allowed
    elif isinstance(value, bool):
        fits = "bool" in allowed
    elif isinstance(value, int):
        fits = "int" in allowed or "float" in allowed
    elif isinstance(value, float):
        fits = "float" in allowed
    else:
        fits = isinstance(value, str) and "str" in allowed
    return None if fits else " or ".join(_KINDS[a] for a in allowed)


def try_build(kind: str, name: str, build: Callable[[], Any]) -> None:
    """Construct the object once (cheap) so that bad values fail at load time (an overflow or a
    division by zero from a value too large or too small included)."""
    try:
        build()
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ValueError(f"bad parameters for {kind} {name!r}: {err}") from None


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
