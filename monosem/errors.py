"""The one exception type users see: a MonosemError names the file, shard, field or value at fault.

The CLI prints its message and exits 2 instead of showing a traceback.
"""


class MonosemError(Exception):
    """A user-facing error: bad input, a missing artefact, a dead producer, a diverged run."""
