#!/usr/bin/env python3
"""A loopback FTP server for the BIND test (pyftpdlib): anonymous read-only access to
--root, on 127.0.0.1 and a free port. Prints "listening 127.0.0.1:PORT" once it accepts,
and exits after --lifetime seconds."""
import argparse
import logging
import sys
import threading
import os

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--lifetime", type=float, default=120)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    auth = DummyAuthorizer()
    auth.add_anonymous(a.root)
    handler = FTPHandler
    handler.authorizer = auth
    server = FTPServer(("127.0.0.1", 0), handler)
    host, port = server.socket.getsockname()[:2]
    print("listening %s:%d" % (host, port), flush=True)
    threading.Timer(a.lifetime, lambda: os._exit(0)).start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
