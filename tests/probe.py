"""`python -m tests.probe [EXIT|pause]`: prints what a started process finds
itself to be, as JSON on stdout, a line on stderr, then exits with EXIT (default
0), or waits for a signal. tests/test_forkserver.py compares a forked child with
a freshly started one."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile

import httpx

if __name__ == "__main__":
    state = {
        "name": __name__,
        "spec": __spec__.name if __spec__ else None,
        "argv": sys.argv,
        "path0": sys.path[0],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "tempdir": tempfile.gettempdir(),
        "own_session": os.getsid(0) == os.getpid(),
        "own_group": os.getpgid(0) == os.getpid(),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "stdin": os.readlink("/proc/self/fd/0"),
        "signals": {
            str(signum): repr(signal.getsignal(signum))
            for signum in (
                signal.SIGINT,
                signal.SIGTERM,
                signal.SIGPIPE,
                signal.SIGCHLD,
                signal.SIGUSR1,
            )
        },
        "hash_randomization": sys.flags.hash_randomization,
        "stdout_line_buffering": sys.stdout.line_buffering,
        "stderr_line_buffering": sys.stderr.line_buffering,
        # The CA certificates of httpx's default SSL context (a forked child has
        # the fork server's, tests/forkserver.py; it must be the one a fresh
        # process would load).
        "ca_certs": [c["serialNumber"] for c in httpx.create_ssl_context().get_ca_certs()],
    }
    print(json.dumps(state), flush=True)
    print("probe: on stderr", file=sys.stderr)
    if sys.argv[1:] == ["pause"]:
        signal.pause()
    raise SystemExit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
