"""Runs a Milvus standalone server from the PyPI package ``milvus`` (embedded Milvus), commanded on stdin.

Run by :mod:`testsupport.milvus_server` with the interpreter of a venv that holds only that package, so it imports
nothing of this project: ``python milvus_driver.py BASE_DIR PORT``. Commands, one per line on stdin: ``start``
(answers ``ready PID PORT`` once the server is healthy, or ``failed REASON``), ``stop`` (answers ``stopped``), ``quit``.
SIGTERM, the end of stdin and the death of the parent process stop the server too.
"""

import os
import signal
import socket
import sys
import threading
import time

from milvus import MilvusServer, MilvusServerConfig


class ReusableConfig(MilvusServerConfig):
    """The package checks that each port is free by binding it without SO_REUSEADDR, so right after a stop (the
    old connections in TIME_WAIT) it would move the server to another port. The server binds with SO_REUSEADDR
    itself; so does this check."""

    def try_bind_port(self, port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            return None


def main() -> int:
    base_dir, port = sys.argv[1], int(sys.argv[2])
    server = MilvusServer(ReusableConfig(proxy_port=port), wait_for_started=True)
    server.set_base_dir(base_dir)
    parent = os.getppid()
    lock = threading.Lock()

    def stop_and_exit(*_) -> None:
        with lock:
            server.stop()
        os._exit(0)

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        stop_and_exit()

    signal.signal(signal.SIGTERM, stop_and_exit)
    # Once in a suite run, a SIGALRM from outside killed this driver while the restarted server came up (exit status
    # -14), leaving the server running with no one to stop it. A Python handler keeps the driver alive; unlike an
    # ignored signal, it is not inherited by the server binary.
    signal.signal(signal.SIGALRM, lambda *_: None)
    threading.Thread(target=watch_parent, daemon=True).start()
    for line in sys.stdin:
        command = line.strip()
        with lock:
            if command == "start":
                try:
                    server.start()
                    print(f"ready {server.server_proc.pid} {server.listen_port}", flush=True)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    server.stop()
                    print(f"failed {type(exc).__name__}: {exc}", flush=True)
            elif command == "stop":
                server.stop()
                print("stopped", flush=True)
            elif command == "quit":
                break
    stop_and_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
