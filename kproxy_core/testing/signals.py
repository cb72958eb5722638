"""SIGTERM and SIGINT as a clean exit, for scripts that build sandboxes (the benchmarks).

Python's default SIGTERM ends the process at once: no ``finally`` clause or ``with`` block
runs, so a `Sandbox`'s namespaces (``kpt<pid>-*``) and the processes inside them outlive a
``kill PID`` or a ``timeout``. After `exit_on_signals`, the first SIGTERM or SIGINT raises
`SystemExit` (status 128 + the signal number, as a shell reports a killed process) in the main
thread, which unwinds through every cleanup. Further ones while that cleanup runs are reported
and ignored, so a second Ctrl-C cannot abandon a half-deleted sandbox (SIGKILL still ends
everything).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from types import FrameType

EXIT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def exit_on_signals(signals: Iterable[signal.Signals] = EXIT_SIGNALS) -> None:
    """Install the handlers; call from the main thread, before building any sandbox."""
    chosen = tuple(signals)
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"

    def during_cleanup(signum: int, _frame: FrameType | None) -> None:
        # os.write, not print: a handler may run in the middle of another write to stderr.
        os.write(2, f"{program}: {signal.Signals(signum).name} ignored: cleaning up\n"
                 .encode())

    def first(signum: int, _frame: FrameType | None) -> None:
        for sig in chosen:
            signal.signal(sig, during_cleanup)
        raise SystemExit(128 + signum)

    for sig in chosen:
        signal.signal(sig, first)
