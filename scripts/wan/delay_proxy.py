#!/usr/bin/env python3
"""A TCP proxy that delays everything it forwards, in both directions, by a fixed time
(one way): the latency of a far link for a test bed whose kernel has no netem. Each
direction's bytes leave in the order they came, each piece `--delay-ms` after it
arrived; a direction holds at most `--buffer` bytes in flight before it stops reading
(so a fast sender is held back, as by a real link's window).

  delay_proxy.py --listen 10.77.1.2:7000 --to 127.0.0.1:7701 --delay-ms 80
"""
import argparse
import asyncio
import time


async def pump(reader, writer, delay, buffer):
    q = asyncio.Queue()
    room = asyncio.Semaphore(max(buffer // 65536, 1))

    async def send():
        while True:
            due, data = await q.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
            room.release()
        try:
            writer.write_eof()
        except OSError:
            pass

    sender = asyncio.create_task(send())
    try:
        while True:
            await room.acquire()
            data = await reader.read(65536)
            q.put_nowait((time.monotonic() + delay, data or None))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--buffer", type=int, default=8 << 20)
    a = ap.parse_args()
    delay = a.delay_ms / 1000
    to_host, to_port = a.to.rsplit(":", 1)

    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, uw, delay, a.buffer), pump(ur, cw, delay, a.buffer),
                             return_exceptions=True)

    host, port = a.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port))
    print(f"delay_proxy listening on {a.listen}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
