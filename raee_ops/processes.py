"""This machine's processes as /proc shows them: whether one still runs, when it started, which run under it."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine. A zombie does not: ended, it waits for its parent to read its
    status, and a parent that reads the output of a command it killed first (`subprocess.run(capture_output=True)`)
    waits for every process holding that output to end."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    fields = _stat(pid)
    return fields is None or fields[0] != b"Z"  # None: no /proc (not Linux), that it exists is all there is to know


def started(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot; None where /proc cannot tell): with the pid, what tells a
    process from a later one given the same pid."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat from the state on (the third; the name before it may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:  # "pid (name) state …"
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def descendants(root: int) -> list[int]:
    """The processes under `root` (children first), read from /proc; none where there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():  # self, thread-self, and what is not a process
            continue
        fields = _stat(int(entry))
        if fields is not None:  # None: one that ended meanwhile
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo += children.get(pid, [])
    return found
