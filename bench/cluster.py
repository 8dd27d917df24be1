"""A private Redis Cluster for `python -m bench --redis cluster`: three masters and three
replicas on loopback, started for one target and stopped with it.

(The test suite's twin is tests/fixtures/cluster.py; this one spawns through bench.procs so
the run's CPU accounting sees the masters.)
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs


@dataclass
class ClusterNodes:
    """The six redis-server children, stopped together (Target.stop calls `stop`)."""

    children: list[procs.Child]

    def stop(self) -> None:
        for child in self.children:
            child.stop()


@dataclass
class PrivateCluster:
    """Six redis-server processes joined by `redis-cli --cluster create`."""

    child: ClusterNodes
    ports: list[int]
    masters: list[int]  # pids of the nodes that serve slots
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @classmethod
    def start(cls, workdir: Path) -> PrivateCluster:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        ports = [free_node_port() for _ in range(6)]
        children = []
        for port in ports:
            argv = [
                binary,
                "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                "--cluster-require-full-coverage", "no",
                "--repl-diskless-sync-delay", "0",
                "--save", "", "--appendonly", "no", "--dir", str(workdir),
                "--maxclients", "20000", "--protected-mode", "no",
            ]  # fmt: skip
            children.append(procs.spawn(f"redis-{port}", argv, workdir / f"redis-{port}.log"))
        nodes = ClusterNodes(children)
        try:
            for child, port in zip(children, ports, strict=True):
                _wait_for_port(child, port)
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                 "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
            masters = _wait_until_ok(ports)
        except BaseException:
            nodes.stop()
            raise
        pids = [c.pid for c, p in zip(children, ports, strict=True) if p in masters]
        return cls(nodes, ports, pids, workdir)


def free_node_port() -> int:
    """A free port P (≤ 55535) with P + 10000 free too, for the node's cluster bus (also
    used by tests/fixtures/cluster.py)."""
    while True:
        port = 20000 + secrets.randbelow(35000)
        if all(_free(each) for each in (port, port + 10000)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_for_port(child: procs.Child, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"redis-server exited:\n{child.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def _wait_until_ok(ports: list[int]) -> set[int]:
    """Wait for cluster_state:ok on every node and every replica in sync; the masters."""
    import redis

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        masters: set[int] = set()
        settled = True
        for port in ports:
            with redis.Redis(port=port, decode_responses=True) as client:
                info = client.execute_command("CLUSTER INFO")
                replication = client.info("replication")
            if info.get("cluster_state") != "ok":
                settled = False
            if replication["role"] == "master" and replication.get("connected_slaves"):
                masters.add(port)
            elif replication["role"] == "slave" and replication["master_link_status"] != "up":
                settled = False
        if settled and len(masters) == 3:
            return masters
        time.sleep(0.1)
    raise RuntimeError("the cluster never settled")
