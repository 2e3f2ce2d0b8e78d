#!/usr/bin/env python3
"""A second flow for the WAN test bed: `sink` receives and prints, once a second,
"T BYTES" (seconds since it started, bytes so far); `send` writes as fast as the link
takes for `--seconds`.

  flow.py sink --listen 10.77.1.2:9000
  flow.py send --to 10.77.1.2:9000 --seconds 20
"""
import argparse
import socket
import sys
import threading
import time


def sink(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_server((host, int(port)))
    print(f"flow sink listening on {addr}", flush=True)
    c, _ = s.accept()
    total = 0
    t0 = time.monotonic()

    def report():
        while True:
            time.sleep(1)
            print(f"{time.monotonic() - t0:.3f} {total}", flush=True)

    threading.Thread(target=report, daemon=True).start()
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        total += len(b)
    print(f"{time.monotonic() - t0:.3f} {total}", flush=True)


def send(addr, seconds):
    host, port = addr.rsplit(":", 1)
    c = socket.create_connection((host, int(port)))
    block = b"\0" * (1 << 16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        c.sendall(block)
    c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["sink", "send"])
    ap.add_argument("--listen")
    ap.add_argument("--to")
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    if a.cmd == "sink":
        sink(a.listen)
    else:
        send(a.to, a.seconds)


if __name__ == "__main__":
    sys.exit(main())
