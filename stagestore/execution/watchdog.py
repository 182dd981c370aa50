"""The runner's watchdog: kills the process groups of a runner's stages when the runner dies.

A process that runs stages starts one watchdog (`python -S watchdog.py`, its own session, so
that neither a terminal's Ctrl-C nor a kill of the runner's process group reaches it) with a
pipe on its standard input.  The runner writes `+PGID` when a stage's process group starts and
`-PGID` once it has ended and been reaped.  When the pipe reaches end of file, which happens
when every copy of its write end is closed, so when the runner exits for whatever reason
(SIGKILL included), the watchdog sends SIGKILL to every group still listed, then exits.

This replaces the parent-death signal (`PR_SET_PDEATHSIG`), which needs code to run in the
child between fork and exec: Python then cannot use `vfork`, and each stage process cost
about 1.2 ms more to start (3,000 of them: 3.6 s).  It also reaches a stage's whole process
group, where the parent-death signal reached only its direct child.

This file imports only `os`, `signal` and `sys`, and runs without `site` (`-S`).
"""

from __future__ import annotations

import os
import signal
import sys


def serve(fd: int) -> set[int]:
    """Read `+PGID` / `-PGID` lines from `fd` until end of file; the groups still listed."""
    groups: set[int] = set()
    pending = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            return groups
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if len(line) < 2 or not line[1:].isdigit():
                continue
            pgid = int(line[1:])
            if line[:1] == b"+":
                groups.add(pgid)
            elif line[:1] == b"-":
                groups.discard(pgid)


def kill_groups(groups: set[int]) -> None:
    for pgid in sorted(groups):
        if pgid <= 1:
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:  # already gone, or not ours to kill
            pass


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    kill_groups(serve(sys.stdin.fileno()))


if __name__ == "__main__":
    main()
