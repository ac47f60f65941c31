"""Errors a user sees as one line: bad input (`UsageError`, exit status 2), a run that cannot go on (`RunFailed`,
exit status 1), an interruption (Ctrl-C: 130; SIGTERM, as sent by `timeout` or a scheduler: 143)."""

import functools
import signal
import sys
import threading


class UsageError(Exception):
    """Bad input (unknown task, missing data, a model path that does not exist, batch sizes that do not
    divide). The message says what to fix."""


class RunFailed(Exception):
    """A run that cannot go on: a reward that raised or returned NaN, a NaN loss. The message names the
    iteration; the last good checkpoint is left as it was."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt, so the same clean-up runs."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports it: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(interrupt, Terminated) else 130


def _raise_terminated(signum, frame):
    raise Terminated()


def one_line_errors(main):
    """Wrap a script's main: a UsageError becomes `error: <message>` on stderr and exit status 2, a RunFailed the
    same with status 1; SIGTERM is handled like Ctrl-C, and an interruption that the script did not handle
    itself (while loading data or building models) ends with one line, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except RunFailed as e:  # on a line of its own, after the progress bar
            print(f"\nerror: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as e:
            print("\ninterrupted while setting up, before the first iteration: nothing new was saved", file=sys.stderr)
            sys.exit(exit_code(e))
        finally:
            if main_thread and previous is not None:  # None: a handler installed outside Python, left alone
                signal.signal(signal.SIGTERM, previous)

    return wrapper
