"""Declared ranges of settings, checked when a run's configuration is resolved.

Every configuration dataclass has a `validate(where)` that gives `check_fields` one Rule per field;
`check_fields` applies them and descends into nested configurations, so a bad value is refused with
its full dotted key (`params.dp.lr`) before any data is read. A field without a rule is a programming
error, so a new setting cannot go unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from privbench.errors import PrivbenchError


@dataclass(frozen=True)
class Rule:
    holds: Callable[[Any], bool]
    must_be: str  # what a valid value is, in words: "a positive integer"
    hint: Callable[[Any], str] | None = None  # more about a bad value, e.g. " (did you mean 'hooks'?)"


class SettingError(PrivbenchError):
    """A setting outside its declared range; `key` is its full dotted name."""

    def __init__(self, key: str, rule: Rule, value: Any):
        self.key, self.rule = key, rule
        hint = rule.hint(value) if rule.hint else ""
        super().__init__(f"setting '{key}' must be {rule.must_be}, got {shown(value)}{hint}")


def shown(value: Any) -> str:
    """A value as the user would write it after `--set key=`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int = 1) -> Rule:
    return Rule(lambda v: _integer(v) and v >= low, "a positive integer" if low == 1 else f"an integer >= {low}")


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number in the interval from `low` to `high` (each end closed unless said open)."""
    above = (lambda v: v > low) if low_open else (lambda v: v >= low)
    below = (lambda v: v < high) if high_open else (lambda v: v <= high)
    if math.isinf(high):
        words = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        words = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(lambda v: _number(v) and above(v) and below(v), words)


POSITIVE_INT = integer(1)
POSITIVE = number(0, low_open=True)
FRACTION = number(0, 1, low_open=True, high_open=True)  # a share of a set: neither part may be empty
PROBABILITY = number(0, 1)
DECAY = number(0, 1, high_open=True)  # an EMA or learning-rate decay factor
FLAG = Rule(lambda v: isinstance(v, bool), "true or false")
UNCHECKED = Rule(lambda v: True, "anything")  # e.g. a path: it is checked where it is read


def one_of(choices: Collection[str], kind: str = "") -> Rule:
    """A name among `choices` (a tuple, or a privbench Registry, which matches names in any case);
    `kind` names them in messages ("classifiers")."""
    names = ", ".join(choices)

    def hint(value: Any) -> str:
        close = difflib.get_close_matches(str(value).lower(), list(choices), n=1)
        return f" (did you mean '{close[0]}'?)" if close else ""

    return Rule(lambda v: isinstance(v, str) and v in choices, f"one of the {kind}: {names}" if kind else f"one of: {names}", hint)


def optional(rule: Rule, none_means: str) -> Rule:
    """`rule`, or None, which means `none_means`."""
    return Rule(lambda v: v is None or rule.holds(v), f"{rule.must_be}, or null for {none_means}", rule.hint)


def each(rule: Rule, empty: bool = False) -> Rule:
    """A list whose every item follows `rule`; it may be empty only with `empty`."""

    def holds(value: Any) -> bool:
        return isinstance(value, tuple) and (empty or len(value) > 0) and all(rule.holds(v) for v in value)

    def hint(value: Any) -> str:
        bad = [v for v in value if not rule.holds(v)] if isinstance(value, tuple) else []
        return (rule.hint(bad[0]) if rule.hint else "") if bad else ""

    return Rule(holds, f"a {'' if empty else 'non-empty '}list, each {rule.must_be}", hint)


def check_fields(config: Any, where: str, **rules: Rule) -> None:
    """Check each field of the dataclass `config` against its rule in `rules`; nested configurations
    check themselves (`field.validate(where + name + ".")`). `where` prefixes the keys in messages."""
    fields = [f.name for f in dataclasses.fields(config)]
    if stray := sorted(set(rules) - set(fields)):
        raise TypeError(f"{type(config).__name__} has no field {stray[0]!r} to check")
    for name in fields:
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            value.validate(f"{where}{name}.")
        elif name not in rules:
            raise TypeError(f"{type(config).__name__}.{name} has no declared range: give it a Rule in validate()")
        elif not rules[name].holds(value):
            raise SettingError(f"{where}{name}", rules[name], value)
