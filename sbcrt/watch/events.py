"""Events: `--when "fox,coyote>=0.6"` rules, debounced over consecutive frames and rate-limited by a cool-down.

A rule matches a frame when any of its labels has probability >= its threshold. It fires once it has matched
`debounce` consecutive processed frames, and then not again until `cooldown_s` seconds (on the source's clock:
video time for a video file) have passed and it has again matched `debounce` frames in a row. One spurious
frame never raises an alert, and a fox standing in the pen for an hour raises one per cool-down, not thousands.

Exactness: a class with probability >= p is always among the top floor(1/p) classes (k classes above it would
sum to more than 1), so the loop ranks `classes_needed()` classes and rules see every class that can match.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sbcrt.errors import SettingError
from sbcrt.watch.types import Event, Record

if TYPE_CHECKING:
    from sbcrt.runtime.classifier import Prediction

__all__ = ["Event", "EventRules", "Rule", "parse_rule"]

RULE = re.compile(r"^(?P<labels>[^<>=]+?)\s*>=\s*(?P<threshold>[^<>=\s]+)$")


@dataclass(frozen=True)
class Rule:
    labels: tuple[str, ...]
    threshold: float
    text: str  # as the user wrote it, normalised: "fox,coyote>=0.6"


def parse_rule(text: str) -> Rule:
    """`label[,label...]>=p` with 0 < p <= 1; raises UsageError naming what is wrong."""
    match = RULE.match(text.strip())
    if not match:
        raise SettingError("when", 'expected "label[,label...]>=probability", e.g. "fox,coyote>=0.6"', text)
    labels = tuple(label.strip() for label in match["labels"].split(","))
    if not all(labels):
        raise SettingError("when", "an empty label (check the commas)", text)
    try:
        threshold = float(match["threshold"])
    except ValueError:
        raise SettingError("when", f"{match['threshold']!r} is not a probability", text) from None
    if not 0.0 < threshold <= 1.0 or math.isnan(threshold):
        raise SettingError("when", "the probability must be above 0 and at most 1", text)
    return Rule(labels, threshold, f"{','.join(labels)}>={match['threshold']}")


@dataclass
class _RuleState:
    streak: int = 0
    last_fired: float | None = None


class EventRules:
    """Evaluates the rules frame by frame; keeps two numbers per rule, so memory never grows."""

    def __init__(self, rules: Sequence[Rule], *, debounce: int = 2, cooldown_s: float = 60.0) -> None:
        if debounce < 1:
            raise SettingError("debounce", "must be at least 1", debounce)
        if cooldown_s < 0:
            raise SettingError("cooldown_s", "cannot be negative", cooldown_s)
        self.rules = list(rules)
        self.debounce = debounce
        self.cooldown_s = cooldown_s
        self._state = [_RuleState() for _ in self.rules]

    def classes_needed(self) -> int:
        """How many top classes must be ranked for every rule to see all classes that can reach its threshold."""
        return max((math.floor(1.0 / rule.threshold + 1e-9) for rule in self.rules), default=1)

    def check_labels(self, labels: Sequence[str]) -> None:
        """Every label in a rule must be one of the model's classes: a typo would otherwise never fire."""
        known = set(labels)
        for rule in self.rules:
            for label in rule.labels:
                if label not in known:
                    close = difflib.get_close_matches(label, list(known), n=3)
                    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                    raise SettingError("when", f"the model has no class {label!r}{hint}", rule.text)

    def update(self, ranked: Sequence[Prediction], record: Record, media_time: float) -> list[Event]:
        """Feed one processed frame (its ranked classes, best first, and its record); the events that fire."""
        fired = []
        for rule, state in zip(self.rules, self._state, strict=True):
            best = max((p for p in ranked if p.label in rule.labels), key=lambda p: p.prob, default=None)
            if best is None or best.prob < rule.threshold:
                state.streak = 0
                continue
            state.streak += 1
            if state.streak < self.debounce:
                continue
            if state.last_fired is not None and media_time - state.last_fired < self.cooldown_s:
                continue
            state.last_fired = media_time
            state.streak = 0
            fired.append(Event(rule.text, best.label, best.prob, record.frame, record.time, record.source, record))
        return fired
