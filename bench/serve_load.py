"""Load on `txagg serve`: user lookups a second against Datasette on the same table, /payouts
pages a second, and the server's memory under load.

    python bench/serve_load.py [--users 1000000] [--duration 20] [--db /tmp/txagg-bench-1m.db]

Needs wrk (`apt-get install -y wrk`). Datasette is installed into its own virtual environment
(/tmp/dsvenv) on first use, so the project's environment stays clean. Every load generator is
wrk in a second process on loopback, 2 threads and 32 connections, each request a random id.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, txagg  # noqa: E402
from report_latency import build  # noqa: E402

DATASETTE_VENV = Path("/tmp/dsvenv")
CONNECTIONS = 32
THREADS = 2

# wrk runs this per request: a random id, zero-padded like the bench store's ids.
LUA = """
math.randomseed(%(seed)d)
request = function()
  return wrk.format("GET", string.format("%(pattern)s", math.random(0, %(top)d)))
end
"""


class Process:
    """A server in a subprocess; ``url`` once it answers ``probe``."""

    def __init__(self, command: list[str], url: str | None, probe: str):
        # Only txagg serve's stdout is read (one line); Datasette logs every request there,
        # and an unread pipe would fill up and stall it.
        stdout = subprocess.PIPE if url is None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            command, stdout=stdout, stderr=subprocess.DEVNULL, text=True
        )
        if url is None:  # txagg serve prints where it listens
            line = self.process.stdout.readline()
            if "listening on" not in line:
                self.stop()
                raise SystemExit(f"txagg serve did not start: {line!r}")
            url = line.rsplit(" ", 1)[1].strip()
        self.url = url
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + probe, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{command[0]} did not answer {probe}")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
        return int(line.split()[1])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wrk(url: str, pattern: str, top: int, seconds: int, server: Process) -> dict:
    """Run wrk with random ids; returns req/s, p50/p99 in ms and the server's peak RSS."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % {"seed": 7, "pattern": pattern, "top": top})
    peak = [server.rss_kib()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak[0] = max(peak[0], server.rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    command = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
    result = subprocess.run(
        [*command, "-s", script.name, url], capture_output=True, text=True, check=True
    )
    done.set()
    sampler.join()
    Path(script.name).unlink()
    output = result.stdout
    if "Non-2xx" in output:
        raise SystemExit(f"wrk saw errors:\n{output}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50": _latency_ms(output, "50%"),
        "p99": _latency_ms(output, "99%"),
        "rss_mib": peak[0] / 1024,
    }


def _latency_ms(output: str, share: str) -> float:
    value, unit = re.search(rf"{share}\s+([\d.]+)(us|ms|s)", output).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def datasette_command(db: Path, port: int) -> list[str]:
    binary = DATASETTE_VENV / "bin" / "datasette"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DATASETTE_VENV)], check=True)
        subprocess.run([str(DATASETTE_VENV / "bin" / "pip"), "install", "-q", "datasette"])
    # Immutable (-i): Datasette's fastest mode, it skips its change checks on every request.
    return [str(binary), "serve", "-i", str(db), "--host", "127.0.0.1", "--port", str(port)]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def users_load(db: Path, users: int, seconds: int) -> tuple[dict, dict]:
    server = Process(txagg("serve", "--db", str(db), "--port", "0"), None, "/users/0000001")
    try:
        wrk(server.url, "/users/%07d", users - 1, 3, server)  # warm the caches
        ours = wrk(server.url, "/users/%07d", users - 1, seconds, server)
    finally:
        server.stop()
    port = free_port()
    name = db.stem
    url = f"http://127.0.0.1:{port}"
    probe = f"/{name}/users/0000001.json"
    datasette = Process(datasette_command(db, port), url, probe)
    try:
        wrk(url, f"/{name}/users/%07d.json", users - 1, 3, datasette)
        theirs = wrk(url, f"/{name}/users/%07d.json", users - 1, seconds, datasette)
    finally:
        datasette.stop()
    return ours, theirs


def payouts_load(db: Path, users: int, seconds: int) -> tuple[dict, float]:
    server = Process(txagg("serve", "--db", str(db), "--port", "0"), None, "/payouts")
    try:
        pattern = "/payouts?limit=100&after=%07d"
        wrk(server.url, pattern, users - 1, 3, server)
        pages = wrk(server.url, pattern, users - 1, seconds, server)
        began, url, walked = time.perf_counter(), "/payouts?limit=1000", 0
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while url:
                body = client.get(url).json()
                walked += len(body["items"])
                url = body["next"]
        if walked != users:
            raise SystemExit(f"walked {walked} payout users, expected {users}")
        return pages, time.perf_counter() - began
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--payout-users", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--db", type=Path, default=Path("/tmp/txagg-bench-1m.db"))
    parser.add_argument("--payouts-db", type=Path, default=Path("/tmp/txagg-bench-100k.db"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    build(args.db, args.users)
    build(args.payouts_db, args.payout_users)  # every bench user has one payout
    ours, theirs = users_load(args.db, args.users, args.duration)
    pages, walk_seconds = payouts_load(args.payouts_db, args.payout_users, args.duration)
    load = f"wrk -t{THREADS} -c{CONNECTIONS} -d{args.duration}s, random ids"
    print(machine())
    print(f"GET /users/{{id}} on {args.users} users ({load}):")
    for name, figures in (("txagg serve", ours), ("datasette -i", theirs)):
        print(
            f"  {name:13} {figures['rps']:9,.0f} req/s  p50 {figures['p50']:.2f} ms  "
            f"p99 {figures['p99']:.2f} ms  peak RSS {figures['rss_mib']:.0f} MiB"
        )
    print(f"  ratio: txagg serve answers {ours['rps'] / theirs['rps']:.1f}x Datasette's rate")
    print(
        f"GET /payouts?limit=100&after={{random id}} on {args.payout_users} payout users: "
        f"{pages['rps']:,.0f} pages/s, p99 {pages['p99']:.2f} ms, "
        f"peak RSS {pages['rss_mib']:.0f} MiB"
    )
    print(
        f"one client walking every page (limit=1000, {args.payout_users // 1000} pages): "
        f"{walk_seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
