"""User-facing errors: one clear line, exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake in the user's flags, config, data or model, reported as one line.

    The CLI catches it, prints ``samlm: error: <message>`` to stderr and exits with code 2.
    """

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none): what a
    ``UserError`` quotes of a library's multi-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NonFiniteLossError(UserError):
    """Training produced non-finite losses for more consecutive steps than allowed."""
