"""The fuzz suite's judge: every case ends in sdlab's own error naming the file or argument, or in a
sane result (checked by the case itself). Raw exceptions, hangs and crashes fail the case.

`judge(family, run, names=(...), sane=None, timeout=30)` runs `run()`:
- it raises an `SdlabError` whose message contains one of `names` -> outcome "refused";
- it returns a value and `sane(value)` is true (or `sane` is None) -> outcome "accepted";
- anything else (another exception type, a message naming neither, a failed sanity check, or no
  answer within `timeout` seconds) fails the test.
Outcomes are counted per family and printed at the end of the run (see conftest.py).
"""

from __future__ import annotations

import collections
import signal
import threading
import time

from sdlab.errors import SdlabError

TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
SECONDS: collections.Counter = collections.Counter()


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def judge(family: str, run, names=(), sane=None, timeout: float = 30.0) -> str:
    start = time.perf_counter()
    use_alarm = threading.current_thread() is threading.main_thread()
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            value = run()
        except SdlabError as error:
            message = str(error)
            if names and not any(name in message for name in names):
                TALLY[family]["unclear error"] += 1
                raise AssertionError(f"{family}: the message names none of {names!r}: {message}") from error
            if "\x1b[" in message:
                TALLY[family]["unclear error"] += 1
                raise AssertionError(f"{family}: terminal colour codes in the message: {message!r}")
            outcome = "refused"
        except Hang:
            TALLY[family]["hang"] += 1
            raise AssertionError(f"{family}: no answer within {timeout} s") from None
        except Exception as error:  # noqa: BLE001 - the point is to catch what escapes
            TALLY[family]["raw exception"] += 1
            raise AssertionError(f"{family}: raw {type(error).__name__}: {error}") from error
        else:
            if sane is not None and not sane(value):
                TALLY[family]["silently wrong"] += 1
                raise AssertionError(f"{family}: accepted, but the result is not sane: {value!r:.300}")
            outcome = "accepted"
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        SECONDS[family] += time.perf_counter() - start
    TALLY[family][outcome] += 1
    return outcome
