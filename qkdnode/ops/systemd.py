"""systemd notification (``sd_notify``) without libsystemd: one datagram per state change.

Does nothing when ``NOTIFY_SOCKET`` is unset (not started by systemd), so the daemon can call it
unconditionally. Supports filesystem and abstract (``@``-prefixed) socket names.
"""

from __future__ import annotations

import os
import socket


class SystemdNotifier:
    """Sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` and ``STOPPING=1`` to systemd."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        if path:
            self._address = b"\0" + path[1:].encode() if path.startswith("@") else path

    def notify(self, *lines: str) -> None:
        """Send the given ``KEY=VALUE`` lines; errors are ignored as systemd does (best effort)."""
        if self._address is None:
            return
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._address)
        except OSError:
            pass  # systemd gone or socket unreachable: nothing useful to do

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), or None if none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.1)
    except ValueError:
        return None
