"""Run flipback's KServe model server (flipback.targets.blackbox.serve) in a subprocess on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """start() waits until GET /v2/health/ready answers 200 (or the deadline passes, or the process
    dies: then it raises with the log's tail). stop()/kill() always reap the process."""

    def __init__(self, args: list[str], log: Path, *, port: int | None = None, env: dict | None = None):
        self.args = args
        self.log = Path(log)
        self.port = port or free_port()
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, model: str) -> str:
        return f"{self.base}/v2/models/{model}"

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        env = dict(os.environ if self.env is None else self.env)
        cmd = [sys.executable, "-m", "flipback.targets.blackbox.serve", *self.args,
               "--http_port", str(self.port), "--enable_grpc", "false", "--host", "127.0.0.1"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)

    def wait_ready(self, deadline_s: float = 90.0) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the model server exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the model server was not ready within {deadline_s:.0f} s:\n{self.tail()}")

    def start(self, deadline_s: float = 90.0) -> "ServerProcess":
        self.launch()
        self.wait_ready(deadline_s)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""
