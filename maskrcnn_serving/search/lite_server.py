"""The Milvus Lite process of one local index folder, listening on a unix socket only.

``python -m maskrcnn_serving.search.lite_server --data-dir FOLDER --socket PATH``, started by
:mod:`maskrcnn_serving.search.database` (never by hand). It is Milvus Lite's own gRPC service (the servicer that
``python -m milvus_lite server`` runs), bound to ``unix:PATH`` instead of a TCP port: the socket lives in a directory
of mode 0700, so only the user who runs the server can connect (docs/security.md). Files it creates are private too
(umask 077).

Order of start-up: Milvus Lite opens the folder first, which takes the folder's lock; only then is a stale socket
(left by a process that was killed) removed and the socket bound. So a second process started on the same folder
exits with status 3 before it touches the socket of the one that holds the folder. SIGTERM / SIGINT: stop answering
(requests in flight get 2 seconds), close the database, remove the socket, exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Milvus standalone's message limit, as Milvus Lite's own server sets it (an index build inserts large batches).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
REQUEST_THREADS = 10
GRACE_SECONDS = 2.0
EXIT_LOCKED = 3  # another process holds the folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'lite_server'}",
                                     description="Milvus Lite on a unix socket (started by maskrcnn-serving).")
    parser.add_argument("--data-dir", required=True, type=Path, help="The Milvus Lite folder.")
    parser.add_argument("--socket", required=True, type=Path, help="The unix socket to listen on.")
    args = parser.parse_args(argv)
    os.umask(0o077)

    import grpc
    from milvus_lite.adapter.grpc.servicer import MilvusServicer
    from milvus_lite.db import MilvusLite
    from milvus_lite.exceptions import DataDirLockedError
    from pymilvus.grpc_gen import milvus_pb2_grpc

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        db = MilvusLite(str(args.data_dir))
    except DataDirLockedError as exc:
        print(f"the folder is held by another process: {exc}", file=sys.stderr, flush=True)
        return EXIT_LOCKED
    try:
        args.socket.unlink(missing_ok=True)  # the folder's lock is ours: a socket here is a dead process's
        server = grpc.server(ThreadPoolExecutor(max_workers=REQUEST_THREADS),
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
        server.add_insecure_port(f"unix:{args.socket}")
        server.start()
        print(f"Milvus Lite serving {args.data_dir} on unix:{args.socket} (pid {os.getpid()})", flush=True)
        while not stop.wait(1.0):
            pass
        server.stop(grace=GRACE_SECONDS).wait()
    finally:
        db.close()
        args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
