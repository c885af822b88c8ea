"""The audit's input errors: the CLI prints their one-line message and exits 2."""


class AuditInputError(ValueError):
    """A missing or malformed input (checkpoint, prompts, bundle); the message names the problem and the path."""
