"""Load on `txagg serve`: user lookups a second against Datasette on the same table, /payouts
pages a second, and the server's memory under load.

    python bench/serve_load.py [--users 1000000] [--duration 20] [--db /tmp/txagg-bench-1m.db]
    python bench/serve_load.py --postgres postgresql://postgres@127.0.0.1/txagg_bench [--users N]

With ``--postgres`` (a database that exists; its store is rebuilt from the SQLite bench store
when it holds fewer users) it measures instead, in one run: ``txagg serve`` on the SQLite store,
a replica on PostgreSQL (its local copy, the default) and the direct-query baseline (every
lookup a query), and the database queries a second each PostgreSQL server makes under that
load (the replica's own count from /metrics, and the database's committed transactions).

Needs wrk (`apt-get install -y wrk`). Datasette is installed into its own virtual environment
(/tmp/dsvenv) on first use, so the project's environment stays clean. Every load generator is
wrk in a second process on loopback, 2 threads and 32 connections, each request a random id.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
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


def build_postgres(url: str, db: Path) -> None:
    """The store at ``url`` with the SQLite bench store's data (the same rows: the same
    answers), every user at data version 1; left alone when it holds as many users."""
    import psycopg

    from txagg.store import Store

    source = sqlite3.connect(db)
    (users,) = source.execute("SELECT value FROM counters WHERE name = 'users'").fetchone()
    with Store.open(url) as store:  # creates or migrates the tables
        if store.counters().get("users", 0) == users:
            return
    began = time.perf_counter()
    tables = {
        "users": "user_id, earned, spent, payout, tx_count, payout_count, last_tx_at",
        "transactions": "id, user_id, created_at, type, amount",
        "counters": "name, value",
        "sync_state": "name, value",
    }
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        cursor.execute("TRUNCATE " + ", ".join(tables))
        for table, columns in tables.items():
            extra = (", version", (1,)) if table == "users" else ("", ())
            with cursor.copy(f"COPY {table} ({columns}{extra[0]}) FROM STDIN") as copy:
                for row in source.execute(f"SELECT {columns} FROM {table}"):
                    copy.write_row(row + extra[1])
        cursor.execute("UPDATE data_version SET value = 1")
    source.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")  # no autovacuum run in the middle of a measurement
    print(f"copied {users} users to PostgreSQL in {time.perf_counter() - began:.0f} s")


def _committed(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]


def _replica_queries(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^txagg_replica_queries_total (\S+)$", text, re.M).group(1))


DIRECT = (
    "import sys; from txagg.server import ServeConfig, serve; "
    "serve(ServeConfig(db=sys.argv[1], port=0, local_copy=False), "
    "on_ready=lambda url: print('listening on', url, flush=True))"
)


def replica_load(db: Path, pg_url: str, users: int, seconds: int) -> list[tuple[str, dict]]:
    """SQLite, a PostgreSQL replica and the direct-query baseline under the same load."""
    servers = [
        ("SQLite", txagg("serve", "--db", str(db), "--port", "0")),
        ("PostgreSQL replica", txagg("serve", "--db", pg_url, "--port", "0")),
        ("PostgreSQL direct", [sys.executable, "-c", DIRECT, pg_url]),
    ]
    results = []
    bodies = set()
    for name, command in servers:
        server = Process(command, None, "/users/0000001")
        try:
            bodies.add(httpx.get(server.url + "/users/0000001", timeout=10).content)
            wrk(server.url, "/users/%07d", users - 1, 3, server)  # warm the caches
            postgres = name.startswith("PostgreSQL")
            committed = _committed(pg_url) if postgres else 0
            pulled = _replica_queries(server.url) if name.endswith("replica") else 0.0
            figures = wrk(server.url, "/users/%07d", users - 1, seconds, server)
            if name.endswith("replica"):
                figures["app_qps"] = (_replica_queries(server.url) - pulled) / seconds
            if postgres:
                time.sleep(2)  # backends report their counts within a second or so
                # Less this bench's own two statements.
                figures["db_qps"] = (_committed(pg_url) - committed - 2) / seconds
            results.append((name, figures))
        finally:
            server.stop()
    if len(bodies) != 1:
        raise SystemExit(f"the servers answered differently: {bodies}")
    return results


def main_postgres(args) -> None:
    build(args.db, args.users)
    build_postgres(args.postgres, args.db)
    results = replica_load(args.db, args.postgres, args.users, args.duration)
    load = f"wrk -t{THREADS} -c{CONNECTIONS} -d{args.duration}s, random ids, 1 worker each"
    print(machine())
    print(f"GET /users/{{id}} on {args.users} users ({load}):")
    for name, figures in results:
        line = (
            f"  {name:19} {figures['rps']:9,.0f} req/s  p50 {figures['p50']:.2f} ms  "
            f"p99 {figures['p99']:.2f} ms  peak RSS {figures['rss_mib']:.0f} MiB"
        )
        if "db_qps" in figures:
            line += f"  database transactions {figures['db_qps']:,.1f}/s"
        if "app_qps" in figures:
            line += f" (replica's own count: {figures['app_qps']:.1f} queries/s)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--payout-users", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--db", type=Path, default=Path("/tmp/txagg-bench-1m.db"))
    parser.add_argument("--payouts-db", type=Path, default=Path("/tmp/txagg-bench-100k.db"))
    parser.add_argument("--postgres", help="compare a PostgreSQL replica (see the docstring)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    if args.postgres:
        main_postgres(args)
        return
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
