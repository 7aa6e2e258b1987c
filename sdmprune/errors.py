"""The one exception family the CLI turns into a single clear error line (exit code 2)."""


class SdmpruneError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model."""


class InputError(SdmpruneError, ValueError):
    """Bad input: a ratio out of range, a path that does not exist, a dataset too short."""
