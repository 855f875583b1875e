"""The shared daemon pair behind the MITM proxy, and checks on what it recorded."""

from __future__ import annotations

import time

from qkdnode.channel.framing import NO_BLOCK
from tests.reliability.harness import Pair
from tests.reliability.proxy import MitmProxy, ProxyThread, Rule, Tampering

# the small per-SAE quota at Alice that scenario 13 runs into
QUOTA_KEYS_PER_S = 2.0
QUOTA_BURST_KEYS = 6.0


class Proxied:
    """The shared pair and its proxy, with helpers to run one tampering at a time."""

    def __init__(self, pair: Pair, thread: ProxyThread) -> None:
        self.pair = pair
        self.thread = thread
        self.proxy: MitmProxy = thread.proxy

    def tamper_once(
        self, rule: Rule, *, timeout_s: float = 30.0, stall: Rule | None = None
    ) -> tuple[Tampering, float]:
        """Arm ``rule`` (times=1); wait until it fired and its connection ended. ``stall``: a
        delay rule armed first (times=1), e.g. to leave a node's session idle long enough for
        a keepalive ping while the pair distils without pause.

        Returns the tampering and the seconds from the tampering to the end of the connection.
        """
        rule.times = 1
        before = len(self.proxy.tamperings())
        if stall is not None:
            stall.times = 1
            self.proxy.add(stall)
        self.proxy.add(rule)
        deadline = time.monotonic() + timeout_s

        def fired() -> list[Tampering]:
            return [t for t in self.proxy.tamperings()[before:] if t.action == rule.action]

        while not fired():
            self.pair.poll()
            self._alive()
            if time.monotonic() > deadline:
                self.proxy.clear()
                raise AssertionError(f"rule never fired: {rule}")
            time.sleep(0.02)
        self.proxy.clear()
        tampering = fired()[0]
        number = tampering.frame.connection
        while True:
            ends = [e for e in self.proxy.ends() if e.connection == number]
            if ends:
                return tampering, ends[0].at_s - tampering.at_s
            self._alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"connection {number} survived {tampering}")
            time.sleep(0.02)

    def sane(self, *, blocks: int = 1, timeout_s: float = 60.0) -> None:
        """A clean session: ``blocks`` more blocks committed on both nodes."""
        self.pair.poll()
        target_a = self.pair.committed("alice") + blocks
        target_b = self.pair.committed("bob") + blocks
        self.pair.wait(
            lambda p: p.committed("alice") >= target_a and p.committed("bob") >= target_b,
            timeout_s=timeout_s,
            what="a clean block",
        )

    def _alive(self) -> None:
        for node, process in self.pair.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{node} exited: {self.pair.stderr(node)[-1500:]}")


def committed_after_tampering(proxied: Proxied, tamperings: list[Tampering]) -> list[str]:
    """Blocks whose frames were tampered and whose commit still went through that connection."""
    problems = []
    frames = proxied.proxy.recorded()
    for tampering in tamperings:
        block = tampering.frame.block
        if block == NO_BLOCK:
            continue
        for frame in frames:
            control = frame.control()
            if (
                frame.connection == tampering.frame.connection
                and control is not None
                and control[0] in ("commit", "committed")
                and control[1].get("block_id") == block
            ):
                problems.append(f"block {block} committed on connection {frame.connection}")
    return problems
