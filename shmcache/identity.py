"""Who holds a segment or a reader slot, for people: pid and PID namespace.

The writer's header words and each reader slot record the holder's pid and
the inode of its PID namespace, so ``dump`` and error messages can say who
it is. They decide nothing: liveness comes from the kernel's locks
(``shmcache.liveness``). A pid is only meaningful inside its namespace; in
a Kubernetes pod each container has its own, which the namespace inode
tells apart.
"""

from __future__ import annotations

import os


def pid_namespace() -> int:
    """Inode of this process's PID namespace (0 where ``/proc`` does not tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def me() -> tuple[int, int]:
    """``(pid, PID namespace inode)`` of this process."""
    return os.getpid(), pid_namespace()


def who(pid: int, namespace: int) -> str:
    """``"pid N"``, with the namespace when it is not this process's."""
    if namespace and namespace != pid_namespace():
        return f"pid {pid} of another PID namespace (pid:[{namespace}]: another container?)"
    return f"pid {pid}"
