"""The data errors (their own module so loaders and splits can both raise them)."""
from __future__ import annotations


class DataError(RuntimeError):
    """A dataset that is missing, unreadable or corrupt; the message names the file and the fix."""


class SplitError(DataError, ValueError):
    """A labeled/validation split the train split cannot supply (too few images of a class); the message names
    the class, the counts and the fix. Also a ValueError, as make_split's other argument errors are."""
