"""One error type for bad input: the scripts print it as one line and exit with status 2."""

import functools
import sys


class UsageError(Exception):
    """Bad input (unknown task, missing data, a model path that does not exist, batch sizes that do not
    divide). The message says what to fix."""


def one_line_errors(main):
    """Wrap a script's main: a UsageError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
