"""Scripts started from one interpreter that has imported what every benchmark imports: a part of
``bench/gpu.sh --cpu-smoke`` starts in a fraction of a second instead of about 8 s of imports.

    python bench/fork_server.py serve SOCKET            # import bench's PRELOAD, then serve until killed
    python bench/fork_server.py run SOCKET SCRIPT ARGS  # SCRIPT ARGS in a child forked from the server

``run`` hands the server its standard input, output and error (file descriptors over the Unix socket),
waits for the child and exits with its status; killed (``timeout``), it kills the child first. SCRIPT
``-`` reads the program from standard input, as ``python -`` does. It waits up to a minute for the
server's socket to appear, so both can be started at once. POSIX only (fork, descriptor passing).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def serve(path: str) -> None:
    """Import the benchmarks' common modules, then run every script sent to ``path`` in a forked child,
    one at a time: reply the child's pid, then its exit status."""
    sys.path.insert(0, str(HERE.parent))
    from bench.__main__ import preload, run_in_child

    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ready = path + ".binding"
    listener.bind(ready)
    listener.listen()
    os.replace(ready, path)  # the socket appears once it accepts
    while True:
        conn, _ = listener.accept()
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 65536, 3)
            request = json.loads(message)
            pid = run_in_child(request["script"], request["argv"], fds, cwd=request["cwd"], close=[listener, conn])
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            try:
                conn.sendall(f"{status}\n".encode())
            except OSError:  # the client was killed
                pass


def run(path: str, script: str, argv: list[str]) -> int:
    """Run ``script argv`` in a fork of the server at ``path`` with this process's standard streams:
    its exit status (negative: killed by that signal)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sys.exit(f"fork_server: no server at {path} after 60 s")
            time.sleep(0.05)
    request = json.dumps({"script": script, "argv": argv, "cwd": os.getcwd()}).encode()
    socket.send_fds(client, [request], [0, 1, 2])
    replies = client.makefile("r")
    pid = int(replies.readline())

    def kill_child(signum, _frame):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, kill_child)
    signal.signal(signal.SIGINT, kill_child)
    status = replies.readline()
    return int(status) if status else 1


def main() -> int:
    usage = "usage: fork_server.py serve SOCKET | run SOCKET SCRIPT [ARGS...]"
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
        return 0
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        status = run(sys.argv[2], sys.argv[3], sys.argv[4:])
        return status if status >= 0 else 128 - status
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
