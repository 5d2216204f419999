"""What the tests read of running processes, from /proc (Linux). The processes watched here end
at any moment, so every reader answers for one that has ended meanwhile: None, "", {} or False."""

from __future__ import annotations

import os


def pids() -> list[int]:
    """Every process's PID now."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [0] the state (Z: a zombie), [1] the
    parent, [3] the session."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    fields = stat(pid)
    return fields is not None and fields[0] != "Z"


def command_of(pid: int) -> str:
    """The command line of ``pid``, its arguments joined by spaces; "" once it has ended (or for a
    kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` started with (what its exec was given; a child between its fork and
    its exec shows its parent's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = f.read().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def processes(*, parent: int | None = None, session: int | None = None) -> list[int]:
    """The live processes (not zombies, not this one) whose parent is ``parent`` or whose session
    is ``session``, sorted."""
    found = []
    for pid in pids():
        fields = stat(pid)
        if fields is None or fields[0] == "Z" or pid == os.getpid():
            continue
        if int(fields[1]) == parent or int(fields[3]) == session:
            found.append(pid)
    return sorted(found)
