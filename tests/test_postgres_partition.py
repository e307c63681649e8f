"""A network partition between the leading ``sync --follow`` and PostgreSQL: the leader runs in
a network namespace of its own and reaches the database and the upstream through a veth pair
and TCP relays; the link is cut (packets dropped silently, no reset reaches either side). The
standby, which still reaches the database, takes over; healed, the cut-off leader steps down,
stands by, and nothing it did after the cut landed.

Against the real PostgreSQL and real ``txagg`` processes; needs root and ``ip`` (iproute2).
Every wait is a wait_for with a generous deadline, never a guess at how long something takes."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import run_txagg, wait_for
from test_postgres_failover import (
    Follower,
    audited_store,
    commits,
    exact_and_fenced,
    last_audit,
    leader_pid,
    standby_pids,
)

PARTITION_DEADLINE = 60.0  # the doc's bound is lease/2 + lease/10 + a page: 6 s and a page


class Relay:
    """A TCP relay: accepts on ``listener`` and relays bytes both ways between each accepted
    connection and a new one made by ``connect``. When either side of a pair ends, both are
    shut. ``close`` stops accepting and shuts and closes every pair."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]):
        self.listener = listener
        self.listener.settimeout(0.2)
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self.connect = connect
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.relays: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            try:
                server = self.connect()
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets.update((client, server))
            relay = threading.Thread(target=self._relay, args=(client, server), daemon=True)
            self.relays.append(relay)
            relay.start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(server, client), daemon=True)
        back.start()
        self._pump(client, server)
        back.join()
        with self.lock:
            self.sockets.difference_update((client, server))
        client.close()
        server.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):  # wakes the other direction's recv or sendall
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed.set()
        self.acceptor.join(10)
        self.listener.close()
        with self.lock:
            live = list(self.sockets)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for relay in self.relays:
            relay.join(10)
        assert not any(relay.is_alive() for relay in self.relays), "a relay did not end"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Partitionable:
    """A network namespace joined to this one by a veth pair: ``host_ip`` on ``host_if`` here,
    ``ns_ip`` inside. Processes run in it (``prefix``) reach this namespace's loopback services
    only through relays (``relay``, ``same_address_inside``) whose traffic crosses the link;
    ``cut`` and ``heal`` take the host end of the link down and up."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.ns = f"txagg-part-{pid}"
        self.host_if, self.ns_if = f"txp{pid}h", f"txp{pid}n"  # at most 11 characters
        used = ip("-4", "-o", "addr", "show").stdout
        subnets = [(pid + k) % 250 + 1 for k in range(250)]
        n = next((n for n in subnets if f" 10.213.{n}." not in used), subnets[0])
        self.host_ip, self.ns_ip = f"10.213.{n}.1", f"10.213.{n}.2"
        self.prefix = ("ip", "netns", "exec", self.ns)
        self.relays: list[Relay] = []

    def create(self) -> None:
        made = ip("netns", "add", self.ns, check=False)
        if made.returncode != 0:
            pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
        peer = ("peer", "name", self.ns_if, "netns", self.ns)
        ip("link", "add", self.host_if, "type", "veth", *peer)
        ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        ip("-n", self.ns, "link", "set", self.ns_if, "up")
        ip("-n", self.ns, "link", "set", "lo", "up")

    def inside(self, make: Callable[[], socket.socket]) -> socket.socket:
        """``make()`` in a thread that entered the namespace: the socket it makes lives there."""
        made: list = []

        def run() -> None:
            try:
                with open(f"/run/netns/{self.ns}", "rb") as handle:
                    if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                made.append(make())
            except BaseException as error:  # noqa: BLE001 (raised in the caller's thread)
                made.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    def relay(self, host: str, port: int) -> tuple[str, int]:
        """A relay from ``host_ip`` (a free port) to ``host:port`` here; its address."""
        relay = Relay(
            socket.create_server((self.host_ip, 0)),
            lambda: socket.create_connection((host, port), timeout=10),
        )
        self.relays.append(relay)
        return relay.address

    def same_address_inside(self, host: str, port: int) -> None:
        """``host:port`` (a loopback service here) at the same address inside the namespace,
        through the link: a relay listening there on ``host:port`` connects, from inside, to
        a relay on ``host_ip``, which connects to the service."""
        link = self.relay(host, port)
        relay = Relay(
            self.inside(lambda: socket.create_server((host, port))),
            lambda: self.inside(lambda: socket.create_connection(link, timeout=10)),
        )
        self.relays.append(relay)

    def cut(self) -> None:
        ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        ip("link", "set", self.host_if, "up")

    def remove(self) -> None:
        errors = []
        for relay in self.relays:
            try:
                relay.close()
            except Exception as error:  # noqa: BLE001 (the namespace goes anyway)
                errors.append(error)
        ip("link", "del", self.host_if, check=False)
        ip("netns", "del", self.ns, check=False)
        assert ip("link", "show", self.host_if, check=False).returncode != 0, "veth left behind"
        assert self.ns not in ip("netns", "list").stdout.split(), "namespace left behind"
        assert not errors, errors


@pytest.fixture
def partitionable():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need the ip command (iproute2), which is missing")
    net = Partitionable()
    try:
        net.create()
        yield net
    finally:
        net.remove()


def via(url: str, address: tuple[str, int]) -> str:
    """``url`` with its host and port replaced by ``address``'s."""
    parts = urlsplit(url)
    user, at, _ = parts.netloc.rpartition("@")
    netloc = f"{user}{at}{address[0]}:{address[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def test_a_leader_cut_off_from_postgres_steps_down(mock_process, pg_database, partitionable):
    """The leader A, in a namespace of its own, is cut off from PostgreSQL and the upstream
    (link down: packets dropped, no reset). The standby B takes over and commits within the
    failover budget; status names B. Healed, A finds it lost the lease, stands by, stays alive
    and made no commit after the cut. At the end the store is the upstream's ground truth,
    exactly, and every commit was made by the holder of the lease at that moment."""
    net = partitionable
    mock, db, common, live_ends = audited_store(mock_process, pg_database, seed=13)

    server = urlsplit(pg_database)
    db_in_ns = via(db, net.relay(server.hostname or "127.0.0.1", server.port or 5432))
    # the store belongs to the upstream's URL: A reads it at that same URL, inside
    upstream = urlsplit(mock.url)
    net.same_address_inside(upstream.hostname, upstream.port)

    a = Follower("txagg-a", db_in_ns, *common, prefix=net.prefix)
    b = None
    try:
        wait_for(lambda: leader_pid(db) == a.pid, timeout=30)
        wait_for(lambda: a.said("leading: epoch 2"), timeout=30)
        wait_for(lambda: commits(db, "txagg-a") > 0, timeout=30)
        # ip netns exec execs txagg in place: the leader's pid is the one started, in the
        # namespace
        with open(f"/proc/{a.pid}/cmdline", "rb") as cmdline:
            assert b"txagg" in cmdline.read()
        assert os.stat(f"/proc/{a.pid}/ns/net").st_ino == os.stat(f"/run/netns/{net.ns}").st_ino

        b = Follower("txagg-b", db, *common)
        wait_for(lambda: b.said("standing by: leader "), timeout=30)
        assert b.said(f":{a.pid}:") and b.said("epoch 2")
        wait_for(lambda: b.pid in standby_pids(db), timeout=30)
        assert commits(db, "txagg-b") == 0

        # the partition: A reaches neither PostgreSQL nor the upstream; B takes over
        seen = len(a.lines)
        net.cut()
        cut_at = time.monotonic()
        at_partition = last_audit(db)  # nothing A sends from now on reaches the server
        wait_for(lambda: leader_pid(db) == b.pid, timeout=PARTITION_DEADLINE)
        wait_for(lambda: commits(db, "txagg-b", at_partition) > 0, timeout=PARTITION_DEADLINE)
        failover = time.monotonic() - cut_at
        wait_for(lambda: b.said("leading: epoch 3"), timeout=30)
        status = run_txagg("status", "--db", db, "--json")
        assert status.returncode == 0, status.stderr
        leader = json.loads(status.stdout)["leader"]
        assert leader["pid"] == b.pid and leader["active"] and leader["epoch"] == 3

        # healed: A finds it lost the lease, steps down and stands by; nothing of it landed
        net.heal()
        healed_at = time.monotonic()
        wait_for(lambda: a.said("standing by: leader ", after=seen), timeout=60)
        stood_by = time.monotonic() - healed_at
        assert a.said("stepping down", after=seen) or a.said("lost", after=seen), a.lines[seen:]
        assert a.said(f":{b.pid}:", after=seen) and a.said("epoch 3", after=seen)
        wait_for(lambda: a.pid in standby_pids(db), timeout=30)
        assert a.process.poll() is None, "the cut-off leader exited instead of standing by"
        assert commits(db, "txagg-a", at_partition) == 0
        print(f"B led and committed {failover:.1f} s after the cut; A stood by {stood_by:.1f} s")

        epochs = exact_and_fenced(mock.url, db, live_ends, {"txagg-a": a.pid, "txagg-b": b.pid})
        assert set(epochs) == {2, 3}
        assert commits(db, "txagg-a", at_partition) == 0
        assert leader_pid(db) == b.pid
        for follower in (a, b):
            follower.process.send_signal(signal.SIGTERM)
            assert follower.process.wait(timeout=60) == 0, follower.lines[-5:]
    finally:
        for follower in (a, b):
            if follower is not None:
                follower.stop()
                print(f"{follower.name} (pid {follower.pid}):", *follower.lines, sep="\n  ")
