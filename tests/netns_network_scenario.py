"""Partition and latency between three fake sites, run inside a fresh network namespace
(``unshare --net python tests/netns_network_scenario.py``) so no rule touches this machine's
own loopback. tests/test_chaos_network.py runs it; it prints one line per check and exits 0 when
every check held."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from watertight.chaos import network
from watertight.runtime import processes

PORT = 9000
SITES = {"a": "127.0.61.1", "b": "127.0.62.1", "c": "127.0.63.1"}
DELAY_MS = 60

AGENT = r"""
import socket, sys, threading, time
address = sys.argv[1]  # "-": a client only
def echo(conn):
    try:
        while (data := conn.recv(100)):
            conn.sendall(data)
    except OSError:
        pass
def serve():
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
if address != "-":
    server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 9000)); server.listen(64)
    threading.Thread(target=serve, daemon=True).start()
kept = {}
def ping(conn):
    conn.settimeout(1.0)
    started = time.monotonic(); conn.sendall(b"x"); conn.recv(10)
    return f"{(time.monotonic() - started) * 1000:.1f}"
for line in sys.stdin:
    words = line.split()
    try:
        if words[0] == "open":
            kept[words[1]] = socket.create_connection((words[2], 9000), timeout=1.0); answer = "ok"
        elif words[0] == "ping":
            answer = ping(kept[words[1]])
        else:  # new HOST: a fresh connection and one echo over it
            with socket.create_connection((words[1], 9000), timeout=1.0) as conn:
                answer = ping(conn)
    except OSError as error:
        answer = "fail " + type(error).__name__
    print(answer, flush=True)
"""


class Agent:
    def __init__(self, site: str, listen: bool = True) -> None:
        self.site = site
        self.process = subprocess.Popen(
            [sys.executable, "-c", AGENT, SITES[site] if listen else "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def ask(self, command: str) -> str:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def rtt_ms(self, command: str) -> float | None:
        answer = self.ask(command)
        return None if answer.startswith("fail") else float(answer)


failures: list[str] = []


def check(what: str, held: bool, detail: object = "") -> None:
    print(f"{'ok  ' if held else 'FAIL'} {what} {detail}", flush=True)
    if not held:
        failures.append(what)


def main() -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    run_dir = Path(tempfile.mkdtemp(prefix="watertight-netns-"))
    agents = {site: Agent(site) for site in SITES}
    time.sleep(0.5)

    def net() -> network.SiteNetwork:
        return network.SiteNetwork(run_dir, SITES, {s: [a.process.pid] for s, a in agents.items()})

    try:
        check("a opens a connection to b before any fault", agents["a"].ask(f"open ab {SITES['b']}") == "ok")
        check("c opens a connection to a before any fault", agents["c"].ask(f"open ca {SITES['a']}") == "ok")
        base = agents["a"].rtt_ms("ping ab")
        check("a reaches b quickly", base is not None and base < 20, base)

        result = network.partition(net(), "a")
        check("the partition found the existing connections", result["existing_connections_cut"] == 2, result)
        check("a's existing connection to b is cut", agents["a"].rtt_ms("ping ab") is None)
        check("c's existing connection to a is cut", agents["c"].rtt_ms("ping ca") is None)
        check("a cannot open a new connection to b", agents["a"].rtt_ms(f"new {SITES['b']}") is None)
        check("b cannot open a new connection to a", agents["b"].rtt_ms(f"new {SITES['a']}") is None)
        check("b still reaches c", agents["b"].rtt_ms(f"new {SITES['c']}") is not None)
        check(
            "the partition is recorded", network.read_state(run_dir).get("partition", {}).get("site") == "a"
        )

        # a process of site a started while the partition is in force (a restart): placed at spawn,
        # as the local runtime does, it is cut at once; one left where it started is not
        late = Agent("a", listen=False)
        check("a late process of a is placed in a's cgroup", network.place(run_dir, "a", late.process.pid))
        check("the late process cannot reach b", late.rtt_ms(f"new {SITES['b']}") is None)
        stray = Agent("a", listen=False)
        check("a process outside the site's cgroup is not cut", stray.rtt_ms(f"new {SITES['b']}") is not None)
        for extra in (late, stray):
            extra.stop()

        network.heal_partition(net())
        check("after healing a reaches b again", agents["a"].rtt_ms(f"new {SITES['b']}") is not None)
        check("after healing the run has no table", network.table_text(run_dir) is None)

        check("a opens a second connection to b", agents["a"].ask(f"open ab2 {SITES['b']}") == "ok")
        result = network.add_latency(net(), DELAY_MS, ["a", "b"])
        slow_existing = agents["a"].rtt_ms("ping ab2")
        check(
            "an existing connection a-b gains twice the delay",
            slow_existing is not None and slow_existing >= 2 * DELAY_MS * 0.9,
            slow_existing,
        )
        slow_new = agents["b"].rtt_ms(f"new {SITES['a']}")
        check(
            "a new connection b-a gains twice the delay",
            slow_new is not None and slow_new >= 2 * DELAY_MS * 0.9,
            slow_new,
        )
        fast = agents["a"].rtt_ms(f"new {SITES['c']}")
        check("a-c is not delayed", fast is not None and fast < DELAY_MS, fast)
        delayer = processes.ProcessRecord(**network.read_state(run_dir)["latency"]["delayer"])
        check("the delayer runs", processes.alive(delayer), result)

        network.remove_latency(net())
        after = agents["a"].rtt_ms("ping ab2")
        check("after removing the latency a-b is fast again", after is not None and after < DELAY_MS, after)
        check("the delayer is gone", not processes.alive(delayer))
        rules = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, text=True).stdout
        check("no queue rule is left", network.table_name(run_dir) not in rules, rules)
        check("no table is left", network.table_text(run_dir) is None)

        # what `watertight down` does after the processes stopped: both faults in force are removed
        network.partition(net(), "a")
        network.add_latency(net(), DELAY_MS, ["b", "c"])
        delayer = processes.ProcessRecord(**network.read_state(run_dir)["latency"]["delayer"])
        for agent in agents.values():
            agent.stop()
        cleared = network.clear_run(run_dir)
        check(
            "clear_run heals the partition and the latency",
            cleared["healed"] == {"partition": "a", "latency_ms": DELAY_MS},
            cleared,
        )
        check("clear_run leaves no table", network.table_text(run_dir) is None)
        rules = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, text=True).stdout
        check("clear_run leaves no queue rule", network.table_name(run_dir) not in rules, rules)
        check("clear_run stops the delayer", not processes.alive(delayer))
        check("clear_run empties the state", network.read_state(run_dir) == {})
        check(
            "clear_run removes the sites' cgroups",
            sorted(cleared["cgroups_removed"]) == sorted(SITES),
            cleared,
        )
        again = network.clear_run(run_dir)
        check("clear_run again finds nothing", again == {"healed": {}, "cgroups_removed": []}, again)
    finally:
        for agent in agents.values():
            agent.stop()
        network.delete_table(run_dir)
        network.release_cgroups(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
