"""A real multi-node Ray cluster on one machine, for tests: a head and worker nodes started with
``ray start --block`` as subprocesses, each in its own session (process group), and stopped by process id.

Every node gets a private ``--temp-dir`` (so ``ray_current_cluster`` and the session files never reach
``/tmp/ray``, where an embedded ``ray.init()`` of another test would find them), free ports of its own, and
``127.0.0.1`` as its address. Killing a node (``kill_node``) SIGKILLs its whole process tree: ``ray start``,
the raylet, its agents and its workers, which is what losing the machine looks like to the rest of the
cluster. ``shutdown`` does the same for every node and is safe to call twice.

Only processes are started and stopped here; nothing of the pipeline is imported.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Fast node-failure detection (the defaults take about 30 s to declare a SIGKILLed node dead).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every live process (Linux /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()   # after "pid (comm) "
        out[int(d)] = (int(rest[1]), int(rest[2]))
    return out


def process_tree(root_pid: int) -> set[int]:
    """``root_pid``, its descendants, and every process in its process group (session leader = root)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_pp, pgid) in table.items() if pgid == root_pid}
    # Descendants of every member (Ray's workers run in process groups of their own under the raylet).
    stack, seen = [root_pid, *found], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if pid in table:
            found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return False
    return raw[raw.rfind(")") + 2:].split()[0] not in ("Z", "X")


def is_ancestor(ancestor: int, pid: int) -> bool:
    table = _proc_table()
    seen = set()
    while pid in table and pid not in seen and pid > 1:
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = table[pid][0]
    return False


def kill_tree(root_pid: int) -> None:
    """SIGKILL ``root_pid``'s process group and every descendant (collected before any is killed)."""
    pids = process_tree(root_pid)
    try:
        os.killpg(root_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class StartupExited(RuntimeError):
    """``ray start`` exited while its node was starting."""


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log_path: str
    resources: dict = field(default_factory=dict)
    temp_dir: str = ""
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class LocalCluster:
    """A head and worker nodes; ``dashboard_url`` is what ``ray job submit --address`` takes."""

    def __init__(self, python_bin_dir: str | None = None, extra_env: dict | None = None):
        self.root = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")   # short: Ray's socket paths have a limit
        self.nodes: list[Node] = []
        bindir = python_bin_dir or os.path.dirname(sys.executable)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": bindir + os.pathsep + env.get("PATH", ""), "PYTHONUNBUFFERED": "1"})
        env.update(FAST_FAILURE_DETECTION)
        env.update(extra_env or {})
        self.env = env
        self.ray_bin = os.path.join(bindir, "ray")
        self.gcs_port, self.dashboard_port = None, None
        self.head: Node | None = None
        # A watchdog kills the nodes if this process dies without shutdown() (SIGKILL, a CI timeout).
        self.pids_file = os.path.join(self.root, "node_pids")
        open(self.pids_file, "w").close()
        self.watchdog = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--watchdog", str(os.getpid()),
                                          self.root], start_new_session=True, stdin=subprocess.DEVNULL)

    # ------------------------------------------------------------------------------------------------
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resources: dict | None) -> Node:
        log_path = os.path.join(self.root, f"{name}.log")
        # A temp dir per node, as on separate machines: nodes sharing one would share the runtime-env
        # cache (working_dir packages), and one node's cleanup removes a package another node's worker uses.
        cmd = [self.ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={os.path.join(self.root, name)}", *args]
        if resources:
            cmd.append("--resources=" + json.dumps(resources))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True, cwd=self.root)
        node = Node(name, proc, log_path, dict(resources or {}), os.path.join(self.root, name))
        self.nodes.append(node)
        with open(self.pids_file, "a") as f:
            f.write(f"{proc.pid}\n")
        return node

    def _node_ports(self) -> list[str]:
        p = free_ports(6)
        return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
                f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
                f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}"]

    def start_head(self, num_cpus: int, resources: dict | None = None, object_store_mb: int = 128,
                   timeout: float = 120) -> Node:
        def attempt(tag: str) -> Node:
            self.gcs_port, self.dashboard_port, client_port = free_ports(3)
            node = self._start(tag, ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client_port}",
                                     f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 2**20}",
                                     *self._node_ports()], resources)
            deadline = time.time() + timeout
            while not self._dashboard_up():
                self._check_alive(node)
                if time.time() > deadline:
                    raise TimeoutError(f"Ray head not up after {timeout} s; log {node.log_path}:\n{self.tail(node)}")
                time.sleep(0.5)
            self.wait_for_nodes(1, timeout=max(5.0, deadline - time.time()), starting=node)
            return node

        self.head = self._retry("head", attempt)
        return self.head

    def add_node(self, name: str, num_cpus: int, resources: dict | None = None, object_store_mb: int = 96,
                 timeout: float = 120) -> Node:
        def attempt(tag: str) -> Node:
            before = self.alive_node_count()
            node = self._start(tag, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                                     f"--object-store-memory={object_store_mb * 2**20}", *self._node_ports()], resources)
            self.wait_for_nodes(before + 1, timeout=timeout, starting=node)
            return node

        return self._retry(name, attempt)

    def _retry(self, name: str, attempt, tries: int = 3) -> Node:
        """``attempt(tag)``, again with fresh ports when ``ray start`` exits during start-up (a port taken
        between choosing it and binding it, by another process on this shared machine)."""
        for i in range(tries):
            try:
                return attempt(name if i == 0 else f"{name}-{i}")
            except StartupExited:
                if i == tries - 1:
                    raise
                failed = self.nodes[-1]
                kill_tree(failed.pid)
                failed.killed = True
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------------
    def _dashboard_up(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _check_alive(self, node: Node) -> None:
        if node.proc.poll() is not None:
            raise StartupExited(f"ray start for {node.name} exited with {node.proc.returncode}:\n{self.tail(node)}")

    def list_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else dict(n)
                for n in list_nodes(address=self.dashboard_url, detail=True, raise_on_missing_output=False)]

    def alive_node_count(self) -> int:
        return sum(1 for n in self.list_nodes() if n["state"] == "ALIVE")

    def wait_for_nodes(self, n_alive: int, timeout: float = 120, starting: Node | None = None) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                count = self.alive_node_count()
            except Exception:  # noqa: BLE001 - the state API answers once the dashboard's modules are up
                count = -1
            if count == n_alive:
                return
            if starting is not None:
                self._check_alive(starting)
            if time.time() > deadline:
                raise TimeoutError(f"expected {n_alive} alive Ray node(s), have {count} after {timeout} s")
            time.sleep(0.5)

    def node_of_pid(self, pid: int) -> Node | None:
        """The node whose process tree holds ``pid`` (a worker process of that node's raylet)."""
        for node in self.nodes:
            if not node.killed and is_ancestor(node.pid, pid):
                return node
        return None

    def kill_node(self, node: Node) -> set[int]:
        """SIGKILL the node's whole process tree; returns the pids killed."""
        pids = process_tree(node.pid)
        kill_tree(node.pid)
        node.killed = True
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return pids

    def tail(self, node: Node, n: int = 40) -> str:
        try:
            with open(node.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def shutdown(self) -> None:
        """SIGKILL every node (workers first), by process id; remove the temp dir. Idempotent."""
        for node in reversed(self.nodes):
            kill_tree(node.pid)
            node.killed = True
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _watchdog(parent_pid: int, root: str) -> None:
    """Until ``parent_pid`` exits; then kill every node listed in ``root``/node_pids and remove ``root``."""
    while True:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(1.0)
    try:
        with open(os.path.join(root, "node_pids")) as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        pids = []
    for pid in reversed(pids):
        try:   # only our `ray start` (its command line names our temp dir), never a process that reused the pid
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = root.encode() in f.read()
        except OSError:
            ours = False
        if ours:
            kill_tree(pid)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--watchdog":
    _watchdog(int(sys.argv[2]), sys.argv[3])
