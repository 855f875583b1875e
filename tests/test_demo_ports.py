"""The ports of a demo or test layout: distinct, so no two servers of a pair collide."""

from __future__ import annotations

import socket

from qkdnode.demo.run import free_port


def test_free_port_never_returns_a_port_twice() -> None:
    # the kernel may offer a just-closed port again; a layout binds its ports only later
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


def test_a_free_port_can_be_bound() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", free_port()))
