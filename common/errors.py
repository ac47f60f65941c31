"""Errors a user sees as one line: bad input (`UsageError`, exit status 2), a run that cannot go on (`RunFailed`,
exit status 1), an interruption (Ctrl-C: 130; SIGTERM, as sent by `timeout` or a scheduler: 143)."""

import contextlib
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


@contextlib.contextmanager
def signals_deferred(reraise: bool = True):
    """Hold Ctrl-C and SIGTERM back while the block runs (a checkpoint or the policy being written: an interrupt
    inside `torch.save` breaks its zip writer). A signal that came meanwhile is raised when the block is done
    (`reraise`), as Terminated or KeyboardInterrupt, or dropped (`reraise=False`: the program is stopping
    already). A signal the process ignores stays ignored; off the main thread, nothing is held back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got and reraise:
        raise Terminated() if got[0] == signal.SIGTERM else KeyboardInterrupt()


class _NoRun:
    """What the wrapper says when no run folder is in use (a refusal before one was claimed, or a process other
    than rank 0)."""

    def stopped(self, failure: bool) -> str:
        return "" if failure else "\ninterrupted while setting up, before the first iteration: nothing new was saved"

    def release(self):
        pass


_run = _NoRun()


def set_run(run) -> None:
    """The run folder in use (common.runtime.RunFolder), or None: asked by `one_line_errors` what an error or an
    interruption that reaches it leaves behind, and released when the script's main returns."""
    global _run
    _run = run if run is not None else _NoRun()


def one_line_errors(main):
    """Wrap a script's main: a UsageError becomes `error: <message>` on stderr and exit status 2, a RunFailed the
    same with status 1; SIGTERM is handled like Ctrl-C, and an interruption that the script did not handle
    itself (while loading data or building models, or after the last iteration) ends with one line, not a
    traceback. The run folder in use (`set_run`) says what such an ending leaves, cleans up after a new run
    stopped before its first checkpoint, and is released when main returns."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            print(f"error: {e}{_run.stopped(True)}", file=sys.stderr)
            sys.exit(2)
        except RunFailed as e:  # on a line of its own, after the progress bar
            print(f"\nerror: {e}{_run.stopped(True)}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as e:
            print(_run.stopped(False), file=sys.stderr)
            sys.exit(exit_code(e))
        finally:
            _run.release()
            set_run(None)
            if main_thread and previous is not None:  # None: a handler installed outside Python, left alone
                signal.signal(signal.SIGTERM, previous)

    return wrapper
