"""A hostile client for the tests: holds N connections to each target that begin a request and
never finish its headers (slowloris), opening a new one as soon as the server closes one, and
writes how many it holds to a JSON status file twice a second.

    python tests/slow_clients.py STATUS.json N host:port [host:port ...]

Run as a process of its own so it does not share the test's interpreter. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

# the attacker's own address: the load and the probes come from 127.0.0.1, and the servers bound
# connections per client address (a test on one address would cap the load with the attack)
SOURCE_ADDRESS = "127.0.0.2"
PARTIAL = b"POST /v1/authorizations HTTP/1.1\r\nHost: core\r\nContent-Type: application/json\r\n"
RECONNECT_PAUSE_S = 0.05


async def hold_one(host: str, port: int, held: dict[str, int], key: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(SOURCE_ADDRESS, 0))
        except OSError:
            await asyncio.sleep(RECONNECT_PAUSE_S)
            continue
        held[key] += 1
        try:
            writer.write(PARTIAL)
            await writer.drain()
            # never the blank line that ends the headers; a server that trickled-in header lines
            # would keep waiting is beaten by a header deadline that counts from the first byte
            while not stop.is_set() and await reader.read(1024):
                pass  # the server answered something: keep reading until it closes
        except OSError:
            pass
        finally:
            held[key] -= 1
            writer.close()


def write_status(path: Path, status: dict[str, object]) -> None:
    """A small file, twice a second: blocking the loop for it is nothing next to the sockets."""
    path.write_text(json.dumps(status))


async def main(status_path: Path, count: int, targets: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    held = dict.fromkeys(targets, 0)
    peak = dict.fromkeys(targets, 0)
    samples: dict[str, list[int]] = {target: [] for target in targets}
    tasks = []
    for target in targets:
        host, _, port = target.rpartition(":")
        tasks += [asyncio.create_task(hold_one(host, int(port), held, target, stop)) for _ in range(count)]
    while not stop.is_set():
        for target in targets:
            peak[target] = max(peak[target], held[target])
            samples[target].append(held[target])
        write_status(status_path, {"time": time.time(), "held": held, "peak": peak, "samples": samples})
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    runner(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
