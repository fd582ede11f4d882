"""Fixtures for the `kvcompact serve` tests: a server on 127.0.0.1 with an ephemeral port, started
from the release binary on the default model and stopped (SIGTERM, then kill) by the test."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
# The release binary of this checkout (CARGO_TARGET_DIR when the build put it elsewhere).
BIN = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "kvcompact"
MODEL = Path(os.environ.get("KVCOMPACT_HOME", REPO / "models")) / "smollm2-135m-instruct"


class Server:
    """A running `kvcompact serve` process."""

    def __init__(self, *args, store=None, env=None):
        if not BIN.exists():
            raise RuntimeError(f"{BIN} is missing: build with `cargo build --release` (scripts/test does)")
        if not (MODEL / "config.json").exists():
            raise RuntimeError(f"{MODEL} is missing: run `cargo run --release -- fetch-model`")
        self.store = store
        cmd = [str(BIN), "--threads", "2", "serve", "--model", str(MODEL), "--port", "0", "--store", str(store), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (http://[\d.]+:\d+)", line)
        if not m:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {err}")
        self.url = m.group(1)

    def metrics(self):
        """`/metrics` as {name: value} for the unlabelled samples."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for ln in text.splitlines():
            if ln.startswith("#") or not ln.strip():
                continue
            name, _, value = ln.rpartition(" ")
            out[name] = float(value)
        return out

    def stop(self, timeout=30):
        """SIGTERM (drain), then kill if it does not exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    """Start servers with extra flags; every one is stopped when the test ends."""
    started = []

    def start(*args, store=None, env=None):
        s = Server(*args, store=store or (tmp_path / "store"), env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One plain server shared by a module's tests."""
    s = Server(store=tmp_path_factory.mktemp("store"))
    yield s
    s.stop()


def generate(prompt, chat=True, max_tokens=24, extra=()):
    """`kvcompact generate --json` on the same model: the reference the server must match."""
    cmd = [str(BIN), "--threads", "2", "generate", "--model", str(MODEL), "--prompt", prompt, "--max-tokens", str(max_tokens), "--json", *extra]
    if chat:
        cmd.append("--chat")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    import json

    return json.loads(out.stdout)


def wait_until(pred, timeout=20.0, every=0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(every)
    return False
