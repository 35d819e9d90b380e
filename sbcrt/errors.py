"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits non-zero."""


class SbcrtError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class UsageError(SbcrtError):
    """Bad flags or an unusable model: exit status 2."""
