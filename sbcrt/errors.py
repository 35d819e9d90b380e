"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits non-zero."""

from __future__ import annotations

from collections.abc import Callable, Sequence

_NO_VALUE = object()


class SbcrtError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class UsageError(SbcrtError):
    """Bad flags or an unusable model: exit status 2."""


class SettingError(UsageError):
    """One setting a caller gave is unusable. The library names settings in its own terms (`save_max`, `calib_dir`);
    the problem may cite other settings, listed in `cites`, as `{name}`. `describe` renders the message with each
    name spelled in the caller's vocabulary: the CLI passes one that turns `save_max` into `--save-max`.
    What the user gave goes in `value`, never into a problem that cites: only named cites are ever replaced."""

    def __init__(self, setting: str, problem: str, value: object = _NO_VALUE, *, cites: Sequence[str] = ()) -> None:
        self.setting = setting
        self.problem = problem
        self.value = value
        self.cites = tuple(cites)
        super().__init__(self.describe(str))

    def describe(self, name_of: Callable[[str], str]) -> str:
        head = name_of(self.setting) if self.value is _NO_VALUE else f"{name_of(self.setting)} {self.value!r}"
        problem = self.problem
        for cited in self.cites:
            problem = problem.replace("{" + cited + "}", name_of(cited))
        return f"{head}: {problem}"
