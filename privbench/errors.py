"""Errors a user can cause and fix: the CLI prints them as one line, without a traceback."""


class PrivbenchError(Exception):
    """A mistake in input, data or configuration; the message names the thing and the fix."""


class PrivacyBudgetExceeded(PrivbenchError):
    """A mechanism would push the composed epsilon of a run past its target."""
