"""Instructions per direct send in the compiled listener, counted by callgrind (independent of machine load).

    python benchmarks/e2e/direct_instructions.py [--mode plain|ack] [--pad 10] [--counts 200,1200] [--tree DIR]

For each count N it runs this file under ``valgrind --tool=callgrind`` as a driver: an in-process rccs
server (compiled fast path), one sender and one receiver of one user on raw sockets (asyncio streams, not
picows, so the only listener code executed is the server's), N ``send``s to the receiver in bursts of 20
(``ack: true`` with ``--mode ack``: the receiver acks each ``msg`` and the sender reads both receipts).
Collection is on only inside the server's ``ServerConnection.on_ws_frame`` (everything from a received
frame to the queued ``msg``: decoding, routing, encoding, counters) and ``ServerConnection.flush``. The
difference between two counts, divided by the difference in N, is the cost of one message without the
connections' hellos. ``--pad`` is the size of a string in each body (10: the e2e benchmark's body size;
65536: a 64 KiB body). Run it from the root of the tree to measure, with valgrind on PATH; a run of 1,200
messages takes about a minute. ``--tree`` measures another checkout's compiled modules (built in place)
with this driver, e.g. a worktree of the commit before a change.

The cyclic garbage collector runs wherever an allocation count crosses its threshold, sometimes inside
the collected functions and sometimes outside them; its share is printed separately.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BURST = 20


def ws_frame(payload: bytes) -> bytes:
    """A masked client frame (all-zero mask key)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x82, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


async def drive(count: int, pad: int, ack: bool) -> None:
    import msgpack

    from rccs import _fastpath
    from rccs.testing import running_server

    assert _fastpath.IMPLEMENTATION == "cython", _fastpath.IMPLEMENTATION

    async def read(reader: asyncio.StreamReader) -> dict:
        _opcode, second = await reader.readexactly(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        return msgpack.unpackb(await reader.readexactly(n))

    async def connect(server, device: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        netloc, path = server.ws_url.split("//")[1].split("/", 1)
        host, port = netloc.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ws_frame(msgpack.packb({"op": "hello", "token": server.issue_token("u", device),
                                             "device": {"type": "bench"}})))
        welcome = await read(reader)
        assert welcome["op"] == "welcome", welcome
        return reader, writer

    async with running_server(ack_timeout=600) as server:
        sender_reader, sender = await connect(server, "a")
        receiver_reader, receiver = await connect(server, "b")
        body = {"sent_ns": 1733100000000000000, "pad": "p" * pad}
        sent = 0
        while sent < count:
            envelopes = [{"op": "send", "id": sent + i, "to": {"device": "b"}, "type": "bench", "body": body}
                         for i in range(BURST)]
            if ack:
                for envelope in envelopes:
                    envelope["ack"] = True
            sender.write(b"".join(ws_frame(msgpack.packb(envelope)) for envelope in envelopes))
            acks = []
            for _ in range(BURST):
                message = await read(receiver_reader)
                assert message["op"] == "msg", message
                if ack:
                    acks.append(ws_frame(msgpack.packb({"op": "ack", "seq": message["seq"]})))
            if ack:
                receiver.write(b"".join(acks))
                receipts = 0
                while receipts < 2 * BURST:  # routed and delivered
                    receipts += (await read(sender_reader))["op"] == "receipt"
            sent += BURST
        connection = next(session.sink for session in server.hub.sessions if session.device == "a")
        assert connection.direct_sends == count, connection.direct_sends


def collected(count: int, pad: int, mode: str, tree: Path) -> tuple[int, int]:
    """(instructions collected, of which the cyclic GC's) for one driver run of ``count`` messages."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        "--toggle-collect=*ServerConnection_on_ws_frame", "--toggle-collect=*ServerConnection_flush",
                        sys.executable, __file__, "--drive", str(count), "--pad", str(pad), "--mode", mode],
                       check=True, env=env, capture_output=True)
        report = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=99.9", out],
                                check=True, capture_output=True, text=True).stdout
    total = gc = 0
    for line in report.splitlines():
        match = re.match(r"\s*([\d,]+) \(.*?\)\s+(\S+)", line)
        if match:
            cost = int(match.group(1).replace(",", ""))
            if match.group(2) == "PROGRAM":
                total = cost
            elif match.group(2).endswith(":gc_collect_main"):
                gc = max(gc, cost)
    return total, gc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["plain", "ack"], default="plain")
    parser.add_argument("--pad", type=int, default=10, help="bytes of padding string in each body (default 10)")
    parser.add_argument("--counts", default="200,1200", help="two message counts (default 200,1200)")
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose rccs to measure (default: this one)")
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)  # the run under valgrind
    args = parser.parse_args()
    if args.drive is not None:
        import uvloop

        uvloop.run(drive(args.drive, args.pad, args.mode == "ack"))
        return
    low, high = (int(n) for n in args.counts.split(","))
    (total_low, gc_low), (total_high, gc_high) = (collected(n, args.pad, args.mode, args.tree)
                                                              for n in (low, high))
    per_message = (total_high - total_low) / (high - low)
    gc_per_message = (gc_high - gc_low) / (high - low)
    print(f"{args.tree}: {args.mode}, pad {args.pad}: {per_message:,.0f} instructions per message "
          f"({per_message - gc_per_message:,.0f} without the cyclic GC's {gc_per_message:,.0f}); "
          f"collected {total_low:,} for {low}, {total_high:,} for {high}")


if __name__ == "__main__":
    main()
