"""`make run` (`vit-lens app`) and `streamlit run streamlit_app.py` serve the page on 127.0.0.1
(the page itself is covered by test_app.py)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.app

ROOT = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["vit-lens app", "streamlit run"])
def test_server_serves_page_on_localhost(launcher, tmp_path):
    port = _free_port()
    if launcher == "vit-lens app":  # from another folder: the options come from the launcher
        argv, cwd = [sys.executable, "-m", "viz_app", "app", "--server.port", str(port)], tmp_path
    else:
        argv, cwd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port)], ROOT
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    assert r.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None, "streamlit exited"
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"<html" in r.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_stopping_vit_lens_app_stops_its_server(tmp_path):
    """`vit-lens app` becomes the Streamlit server (exec): a SIGTERM to it leaves no server behind
    (a child process kept serving after its parent was terminated)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "viz_app", "app", "--server.port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
