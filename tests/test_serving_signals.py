"""SIGTERM (what systemd, Docker and Kubernetes send) stops `python -m serving.run` as cleanly as
Ctrl-C: the application, then the local Ray instance it started, no native stack dump, exit
status 0, and no Ray process of it left running (serving/run.py: StopOnSigterm)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from support.net import free_port

REPO = Path(__file__).resolve().parents[1]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return str(proc.pid)


def _members(sid: int, session_dir: str | None) -> list[psutil.Process]:
    """Live processes in session `sid` or naming `session_dir` on their command line."""
    found = []
    for p in psutil.process_iter():
        try:
            if _alive(p) and (os.getsid(p.pid) == sid or (session_dir and session_dir in " ".join(p.cmdline()))):
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def _ray_processes(driver: psutil.Process) -> tuple[dict[int, psutil.Process], str | None]:
    """The driver's descendants, plus every process naming its Ray session directory
    (session_<date>_<driver pid>) on its command line or sharing its session id (all the Ray
    processes it starts inherit it; the test starts the driver in a session of its own)."""
    procs = {p.pid: p for p in driver.children(recursive=True)}
    pattern = re.compile(r"[^=\s]*session_[\d_-]+_%d\b" % driver.pid)
    session_dir = None
    for p in procs.values():
        try:
            for arg in p.cmdline():
                m = pattern.search(arg)
                if m:
                    session_dir = m.group(0)
                    break
        except psutil.Error:
            pass
        if session_dir:
            break
    for p in _members(driver.pid, session_dir):
        if p.pid != driver.pid:
            procs.setdefault(p.pid, p)
    return procs, session_dir


def _wait_health(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited early ({server.returncode})"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url}/health did not answer within {timeout_s:.0f} s")


def test_sigterm_handler_raises_keyboard_interrupt_once():
    """StopOnSigterm turns the first SIGTERM into KeyboardInterrupt (the Ctrl-C path) and ignores
    the ones that arrive while the shutdown runs."""
    from serving.run import StopOnSigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopOnSigterm()
        stop.install()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                       # the handler runs here, in the main thread
        assert stop.received and stop.stopping
        os.kill(os.getpid(), signal.SIGTERM)    # during the shutdown: ignored
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@pytest.mark.slow
def test_sigterm_stops_the_server_and_its_local_ray_instance(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # The smallest deployment: the embedded model, no datastore to build, one decoder replica.
    cmd = [sys.executable, "-m", "serving.run", "--port", str(port), "--timeout", "600", "--no-dashboard",
           "--set", "index.dense=null", "--set", "index.sparse=null", "--set", "speculative.method=pld"]
    log_path = tmp_path / "server.log"
    procs: dict[int, psutil.Process] = {}
    session_dir = None
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        driver = psutil.Process(server.pid)
        _wait_health(url, server, timeout_s=600)
        procs, session_dir = _ray_processes(driver)
        names = " ".join(_describe(p) for p in procs.values())
        assert session_dir, f"no Ray session directory found among {names}"
        for kind in ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "ServeController"):
            assert kind in names, f"{kind} not among the server's processes: {names}"

        t0 = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the server was still running 60 s after SIGTERM")
        exited_s = time.monotonic() - t0
        deadline = t0 + 60
        while time.monotonic() < deadline and any(_alive(p) for p in procs.values()):
            time.sleep(0.5)
        gone_s = time.monotonic() - t0
        output = log_path.read_text(errors="replace")
        survivors = [_describe(p) for p in procs.values() if _alive(p)]
        print(f"server exited {exited_s:.1f} s after SIGTERM (status {rc}); its {len(procs)} Ray processes "
              f"gone after {gone_s:.1f} s")

        stragglers = [p for p in _members(server.pid, session_dir) if p.pid not in procs]
        problems = []
        if "SIGTERM received" in output:
            problems.append("a native stack dump (*** SIGTERM received ***)")       # Ray's crash handler
        if rc != 0:
            problems.append(f"exit status {rc}")
        if "stopping (SIGTERM)" not in output:
            problems.append("not the orderly (Ctrl-C) shutdown path")
        if survivors:
            problems.append(f"left running 60 s after SIGTERM: {survivors}")
        if stragglers:
            problems.append(f"processes of {session_dir} still running: {[_describe(p) for p in stragglers]}")
        assert not problems, "\n".join(problems) + "\n--- server output (end) ---\n" + output[-2500:]
    finally:                                    # never leave this test's processes behind
        if server.poll() is None:
            server.kill()
            server.wait()
        for p in [*procs.values(), *_members(server.pid, session_dir)]:
            try:
                p.kill()
            except psutil.Error:
                pass

