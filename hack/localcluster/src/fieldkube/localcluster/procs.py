"""Processes of a local cluster: start, identify (pid + start time), stop, inspect.

Part of the local control plane harness (fieldkube.localcluster.harness); Linux only (/proc, prctl).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The local cluster could not be built, started, reached or stopped."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_time_of(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone or a zombie.

    A pid plus its start time names one process for good: pids get reused, start times do not repeat.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def kill_when_parent_dies() -> None:
    """Runs in a child before exec: the kernel kills it when the process that started it dies.

    Used when a cluster belongs to a test session or a benchmark, so a session killed hard (SIGKILL,
    OOM) leaves no control plane behind. Linux only (prctl PR_SET_PDEATHSIG).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


@dataclass
class Process:
    name: str
    pid: int
    argv: list[str]
    log: str
    start_time: int | None = None

    def alive(self) -> bool:
        """True while the recorded process runs (the pid is not a later, unrelated process)."""
        now = start_time_of(self.pid)
        if now is None:
            return False
        if self.start_time is not None:
            return now == self.start_time
        try:  # a record without a start time: compare the program instead
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return bool(cmdline) and cmdline[0].decode(errors="replace") == self.argv[0]


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    on_fail: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns a value other than None/False, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except Exception as exc:  # the probe's failure is reported if the wait times out
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            extra = f"\n{on_fail()}" if on_fail else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{extra}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} is unreadable)"
    return f"--- last {lines} lines of {path} ---\n" + "\n".join(text[-lines:])


def listening_inodes() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP socket in LISTEN state (/proc/net/tcp{,6})."""
    result: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: TCP_LISTEN
                continue
            address_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address_hex)
            # The kernel prints the address as 32-bit words in host (little-endian) byte order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            result[int(fields[9])] = (str(ipaddress.ip_address(packed)), int(port_hex, 16))
    return result


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children
