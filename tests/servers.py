"""Real servers for tests: started on free loopback ports, waited for, stopped afterwards.

A server that does not come up fails the test loudly with its log; nothing is ever skipped.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import httpx

VENV_BIN = Path(sys.executable).parent


#: Ports `free_port` handed out in this process: never the same one twice in a run (servers may be
#: started from several threads at once: the lock makes a pick and its record one step).
_GIVEN: set[int] = set()
_GIVEN_LOCK = threading.Lock()
#: Where the candidates are drawn from (a test replaces it).
_RANDOM = random.Random()


def _ephemeral_low() -> int:
    """Where the kernel's range for the local port of an outgoing connection starts (Linux), else its usual default."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on, for a server about to start.

    Picked below the kernel's ephemeral range where there is room: a port asked of the kernel
    (`bind(0)`) comes from that range, where any outgoing connection of the run (a client of
    another server) can take it as its own local port between this pick and the server's bind
    (seen: `bentoml serve` exiting with "Address already in use" once in a full run).
    """
    low = _ephemeral_low()
    with _GIVEN_LOCK:
        candidates = _RANDOM.sample(range(max(1024, low - 10000), low), k=min(200, max(0, low - 1024)))
        for port in candidates:
            if port in _GIVEN:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _GIVEN.add(port)
            return port
        while True:  # no room below the range: the kernel's pick, still never one handed out before
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _GIVEN:
                _GIVEN.add(port)
                return port


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


class ManagedServer:
    """A server process we own: start, stop, pause (SIGSTOP), resume, restart on the same port."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_dir: Path, *, env: Optional[dict[str, str]] = None,
                 ready: Optional[Callable[[], bool]] = None, start_timeout: float = 60.0, cwd: Optional[Path] = None):
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.ready = ready or (lambda: port_open(port))
        self.start_timeout = start_timeout
        self.cwd = cwd
        self.log_path = log_dir / f"{name}-{port}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ManagedServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready on port {self.port} after {self.start_timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> "ManagedServer":
        self.stop()
        return self.start()

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(os.getpgid(self.proc.pid), signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(os.getpgid(self.proc.pid), signal.SIGCONT)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"


def redis_server(log_dir: Path, port: Optional[int] = None, *, password: Optional[str] = None) -> ManagedServer:
    port = port or free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(log_dir)]
    if password:
        argv += ["--requirepass", password]
    return ManagedServer("redis", argv, port, log_dir)


def _conf_dir(log_dir: Path, name: str, port: int) -> Path:
    path = log_dir / f"{name}-{port}.d"
    path.mkdir(parents=True, exist_ok=True)
    return path


def redis_replica(log_dir: Path, master_port: int, port: Optional[int] = None, *,
                  password: Optional[str] = None) -> ManagedServer:
    """A redis-server replicating the one on `master_port` (a conf file with `replicaof`), its own directory."""
    port = port or free_port()
    directory = _conf_dir(log_dir, "redis-replica", port)
    lines = [f"port {port}", "bind 127.0.0.1", 'save ""', "appendonly no", f"dir {directory}",
             f"replicaof 127.0.0.1 {master_port}"]
    if password:
        lines += [f"requirepass {password}", f"masterauth {password}"]
    conf = directory / "redis.conf"
    conf.write_text("\n".join(lines) + "\n")
    return ManagedServer("redis-replica", ["redis-server", str(conf)], port, log_dir)


def redis_sentinel(log_dir: Path, master_port: int, port: Optional[int] = None, *, service: str = "mymaster",
                   quorum: int = 2, password: Optional[str] = None, down_after_ms: int = 1000,
                   failover_timeout_ms: int = 5000) -> ManagedServer:
    """`redis-server <conf> --sentinel` watching the master on `master_port` (the conf is rewritten by the sentinel)."""
    port = port or free_port()
    directory = _conf_dir(log_dir, "redis-sentinel", port)
    lines = [f"port {port}", "bind 127.0.0.1", f"dir {directory}",
             f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
             f"sentinel down-after-milliseconds {service} {down_after_ms}",
             f"sentinel failover-timeout {service} {failover_timeout_ms}"]
    if password:
        lines.append(f"sentinel auth-pass {service} {password}")
    conf = directory / "sentinel.conf"
    conf.write_text("\n".join(lines) + "\n")
    return ManagedServer("redis-sentinel", ["redis-server", str(conf), "--sentinel"], port, log_dir)


def s3_server(log_dir: Path, port: Optional[int] = None) -> ManagedServer:
    port = port or free_port()
    argv = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    return ManagedServer("moto-s3", argv, port, log_dir, ready=http_ok(f"http://127.0.0.1:{port}/moto-api/"))


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


#: MLflow's registry webhooks to loopback receivers: plain http, private addresses, and the
#: webhook list re-read every second (it is cached for 60 s by default).
WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
}


def mlflow_server(log_dir: Path, db_path: Path, artifact_root: str, s3_endpoint: str, port: Optional[int] = None) -> ManagedServer:
    """`mlflow server` with a sqlite store, artifacts straight on S3 (no proxy), one worker."""
    port = port or free_port()
    argv = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db_path}",
            "--default-artifact-root", artifact_root, "--no-serve-artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**S3_ENV, **QUIET_ENV, **WEBHOOK_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    return ManagedServer("mlflow", argv, port, log_dir, env=env, ready=http_ok(f"http://127.0.0.1:{port}/health"),
                         start_timeout=120)


def training_api(log_dir: Path, env: dict[str, str], port: Optional[int] = None) -> ManagedServer:
    port = port or free_port()
    argv = [sys.executable, "-m", "training.api", "--port", str(port), "--log-level", "warning"]
    repo = Path(__file__).resolve().parent.parent
    return ManagedServer("training-api", argv, port, log_dir, env={**QUIET_ENV, **env}, cwd=repo,
                         ready=http_ok(f"http://127.0.0.1:{port}/health"), start_timeout=90)
