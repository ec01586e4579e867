"""bench/netlab.py, the emulated home LAN: links shaped to their rate, and nothing left behind,
whether the LAN closes normally, on SIGTERM or Ctrl-C, or its creator is killed outright."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("netlab", ROOT / "bench" / "netlab.py")
netlab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netlab)


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    probe = f"{netlab.PREFIX}{os.getpid()}nprobe"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


pytestmark = pytest.mark.skipif(not _can_make_namespaces(), reason="needs root, ip and tc (network namespaces)")


def _ours(pid: int) -> list[str]:
    return [ns for ns in netlab._namespaces() if ns.startswith(f"{netlab.PREFIX}{pid}")]


def test_rates_parse_and_bad_ones_are_refused():
    assert netlab.rate_bits("100mbit") == 100e6
    assert netlab.rate_bits("1gbit") == 1e9
    assert netlab.rate_bits("2.5Mbit") == 2.5e6
    for bad in ("100", "fast", "10mb", ""):
        with pytest.raises(ValueError):
            netlab.rate_bits(bad)


def test_every_link_carries_its_rate_and_closing_leaves_nothing():
    with netlab.Lan(3, "100mbit") as lan:
        assert len(_ours(os.getpid())) == 4  # the hub and 3 nodes
        assert lan.addresses == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        # Through the bridge, node 2 to node 1: both links shaped, TCP close to the rate.
        rate = netlab.tcp_rate(lan, 2, 1, megabytes=6)
        assert 60e6 < rate < 105e6, rate
        # Nothing of the LAN is on the machine's own network.
        assert "10.77.0." not in subprocess.run(["ip", "addr"], capture_output=True, text=True).stdout
    assert _ours(os.getpid()) == []


def test_processes_started_in_the_lan_are_stopped_with_it():
    with netlab.Lan(1, None) as lan:
        sleeper = lan.popen(0, [sys.executable, "-c", "import time; time.sleep(600)"])
    assert sleeper.poll() is not None
    assert _ours(os.getpid()) == []


CREATOR = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("netlab", sys.argv[1])
    netlab = importlib.util.module_from_spec(spec); spec.loader.exec_module(netlab)
    with netlab.Lan(2, "1gbit") as lan:
        print("up", flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["term", "int", "kill"])
def test_an_interrupted_creator_leaves_nothing(sig):
    proc = subprocess.Popen([sys.executable, "-c", CREATOR, str(ROOT / "bench" / "netlab.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up", proc.stderr.read()
        assert len(_ours(proc.pid)) == 3
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGKILL:  # nothing could run in the creator: the next LAN sweeps its namespaces
        left = _ours(proc.pid)
        assert len(left) == 3
        assert set(left) <= set(netlab.sweep_stale())
    assert _ours(proc.pid) == []


def test_the_command_line_measures_and_cleans_up(capsys):
    assert netlab.main(["--nodes", "2", "--rates", "1gbit", "--megabytes", "32"]) == 0
    out = capsys.readouterr().out
    assert "node 1 -> node 0" in out and "Mbit/s TCP" in out and "no netem" in out
    assert _ours(os.getpid()) == []
