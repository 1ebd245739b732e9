"""The one exception type for expected user errors.

Anything a user can cause by bad input (a missing file, a mistyped key, mismatched
shapes between a checkpoint and shards) raises `UserError` with one line that names the
file, key or value and what was expected. `python -m saev` prints that line and exits
with status 2 instead of showing a traceback; library callers can catch it.
"""


class UserError(Exception):
    """An expected error caused by input; its message is shown to the user as-is."""
