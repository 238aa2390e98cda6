"""The delayer: holds every packet nftables queues to it (NFQUEUE) for a fixed delay, then lets it
go. ``python -m watertight.chaos.netdelay --queue N --delay-ms D``.

Why: the kernel of this machine has no ``netem`` qdisc, so added latency between the local sites
is done in user space. Speaks nfnetlink_queue over a raw netlink socket (no C library): it asks
for metadata only (no payload copy) and, because every packet waits the same delay, releases them
in arrival order with one batch verdict ("accept every id up to N") per wake-up.

Bounds: at most ``--lifetime-s`` seconds (then it exits; the rule's ``bypass`` lets packets pass
undelayed), at most QUEUE_MAXLEN packets held by the kernel (beyond that the queue fails open).
On SIGTERM it accepts everything it holds before it unbinds: unbinding would drop them.
Never: drop a packet on purpose, or read a payload.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_CFG_F_GSO = 4
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLMSG_HEADER = struct.Struct("=IHHII")
NFGEN_HEADER = struct.Struct("=BBH")  # family, version, res_id (big endian, packed by hand)

QUEUE_MAXLEN = 65_536
RECEIVE_BUFFER_BYTES = 16 * 1024 * 1024
RECEIVE_CHUNK_BYTES = 1 << 20


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attributes: bytes, sequence: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = NFGEN_HEADER.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attributes
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, sequence, 0
    )
    return header + body


def _config(queue: int, sequence: int, command: int | None = None) -> bytes:
    if command is not None:
        attributes = _attribute(NFQA_CFG_CMD, struct.pack("!BxH", command, 0))
        return _message(NFQNL_MSG_CONFIG, queue, attributes, sequence, NLM_F_REQUEST | NLM_F_ACK)
    flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
    attributes = (
        _attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
        + _attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
        + _attribute(NFQA_CFG_MASK, struct.pack("!I", flags))
        + _attribute(NFQA_CFG_FLAGS, struct.pack("!I", flags))
    )
    return _message(NFQNL_MSG_CONFIG, queue, attributes, sequence, NLM_F_REQUEST | NLM_F_ACK)


def verdict_batch(queue: int, packet_id: int, sequence: int) -> bytes:
    """Accept every packet of the queue with an id up to ``packet_id``."""
    attributes = _attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
    return _message(NFQNL_MSG_VERDICT_BATCH, queue, attributes, sequence)


def packet_ids(data: bytes) -> tuple[list[int], list[int]]:
    """The packet ids in a buffer of netlink messages, and the error codes of any acks in it."""
    ids: list[int] = []
    errors: list[int] = []
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            break
        if kind == NLMSG_ERROR:
            errors.append(-struct.unpack_from("=i", data, offset + NLMSG_HEADER.size)[0])
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            position = offset + NLMSG_HEADER.size + NFGEN_HEADER.size
            end = offset + length
            while position + 4 <= end:
                attribute_length, attribute_kind = struct.unpack_from("=HH", data, position)
                if attribute_length < 4:
                    break
                if attribute_kind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, position + 4)[0])
                    break
                position += (attribute_length + 3) & ~3
        offset += (length + 3) & ~3
    return ids, errors


class Delayer:
    def __init__(self, queue: int, delay_s: float) -> None:
        self.queue = queue
        self.delay_s = delay_s
        self.sequence = 0
        self.held: collections.deque[tuple[float, int]] = collections.deque()
        self.released = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))

    def _request(self, message: bytes) -> None:
        self.sock.send(message)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if not select.select([self.sock], [], [], 0.2)[0]:
                continue
            ids, errors = packet_ids(self.sock.recv(RECEIVE_CHUNK_BYTES))
            self._hold(ids)
            if errors:
                if errors[0] != 0:
                    raise OSError(errors[0], f"netlink refused the request: {os.strerror(errors[0])}")
                return
        raise TimeoutError("netlink did not acknowledge the request")

    def bind(self) -> None:
        self.sequence += 1
        self._request(_config(self.queue, self.sequence, NFQNL_CFG_CMD_BIND))
        self.sequence += 1
        self._request(_config(self.queue, self.sequence))

    def _hold(self, ids: list[int]) -> None:
        now = time.monotonic()
        for packet_id in ids:
            self.held.append((now + self.delay_s, packet_id))

    def release_due(self, now: float, everything: bool = False) -> None:
        last = None
        while self.held and (everything or self.held[0][0] <= now):
            last = self.held.popleft()[1]
            self.released += 1
        if last is not None:
            self.sequence += 1
            self.sock.send(verdict_batch(self.queue, last, self.sequence))

    def run(self, lifetime_s: float, stopping: list[bool]) -> None:
        ends_at = time.monotonic() + lifetime_s
        while not stopping and time.monotonic() < ends_at:
            now = time.monotonic()
            wait = min(0.5, max(0.0, self.held[0][0] - now)) if self.held else 0.5
            if select.select([self.sock], [], [], wait)[0]:
                ids, _ = packet_ids(self.sock.recv(RECEIVE_CHUNK_BYTES))
                self._hold(ids)
            self.release_due(time.monotonic())
        self.release_due(time.monotonic(), everything=True)

    def close(self) -> None:
        try:
            self.sequence += 1
            self.sock.send(_config(self.queue, self.sequence, NFQNL_CFG_CMD_UNBIND))
        finally:
            self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m watertight.chaos.netdelay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number to bind")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay of every packet, one way")
    parser.add_argument("--lifetime-s", type=float, default=3600.0, help="exit after this long")
    parser.add_argument("--ready-file", help="created once the queue is bound")
    args = parser.parse_args(argv)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    delayer = Delayer(args.queue, args.delay_ms / 1000.0)
    try:
        delayer.bind()
        print(f"netdelay: bound queue {args.queue}, delaying every packet {args.delay_ms:g} ms", flush=True)
        if args.ready_file:
            Path(args.ready_file).touch()
        delayer.run(args.lifetime_s, stopping)
    finally:
        delayer.close()
    reason = "asked to stop" if stopping else f"lifetime of {args.lifetime_s:g} s over"
    print(f"netdelay: released {delayer.released} packets; exiting ({reason})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
