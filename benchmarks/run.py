"""Run benchmark scripts by name: ``tox -e bench -- NAME [ARGS...]`` (``tox -e bench`` lists
them). Each script prints numbers and asserts nothing; results go to docs/benchmarks.md with
date and machine."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from kproxy_core.testing.signals import exit_on_signals

HERE = Path(__file__).resolve().parent


def scripts() -> dict[str, str]:
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.name == "run.py":
            continue
        doc = path.read_text().split('"""')
        summary = doc[1].strip().splitlines()[0] if len(doc) > 2 else ""
        found[path.stem] = summary
    return found


def main(argv: list[str]) -> int:
    available = scripts()
    if not argv or argv[0] not in available:
        if argv:
            print(f"unknown benchmark {argv[0]!r}", file=sys.stderr)
        print("benchmarks (tox -e bench -- NAME [ARGS...]):")
        for name, summary in available.items():
            print(f"  {name:<24} {summary}")
        return 2 if argv else 0
    name, *args = argv
    exit_on_signals()
    # Its own session: a Ctrl-C reaches the script once, through us, not twice.
    child = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *args],
                             start_new_session=True)
    try:
        return child.wait()
    except SystemExit as exc:
        # Passed on (subprocess.run would SIGKILL the script, leaving its sandbox behind):
        # the script cleans up and exits, and so do we.
        code = exc.code if isinstance(exc.code, int) and exc.code > 128 else 0
        child.send_signal(code - 128 if code else signal.SIGTERM)
        child.wait()
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
