"""A node with several peers (``[[peers]]``): what it reads per link, and every mistake named by
file, dotted key and fix. The single-peer form is the list of one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qkdnode.config import SimulatedLinkConfig, load_config
from qkdnode.errors import ConfigError

RELAY = """
[node]
name = "r"

[[peers]]
name = "a"
role = "bob"
listen = "127.0.0.1:7001"
io_timeout_s = 7.0

[[peers]]
name = "c"
role = "alice"
connect = "127.0.0.1:7002"
store_directory = "elsewhere/c"

[peers.link]
backend = "simulated"
fibre_host = "127.0.0.1"
fibre_port = 7332
fiber_km = 10.0

[peers.auth]
mode = "psk"
psk_file = "c.psk"

[link]
backend = "simulated"
fibre_host = "127.0.0.1"
fibre_port = 7331

[postprocess]
block_pulses = 1000000

[auth]
mode = "psk"
psk_file = "a.psk"

[store]
directory = "stores"
"""

DELIVERY = """
[delivery]
peer = "c"
listen = "127.0.0.1:8443"
certificate = "kme.pem"
private_key = "kme.key"
sae_ca = "sae-ca.pem"
kme_id = "r"
peer_kme_id = "c"
local_saes = ["sae-r"]
peer_saes = ["sae-c"]
master_parity = 0
"""


def write_relay_config(tmp_path: Path) -> Path:
    """R's config (``RELAY``) in ``tmp_path`` with the files it names."""
    for name in ("a.psk", "c.psk", "kme.key"):
        path = tmp_path / name
        path.write_text(os.urandom(32).hex())
        path.chmod(0o600)
    for name in ("kme.pem", "sae-ca.pem"):
        (tmp_path / name).write_text("placeholder: only its existence is checked at load")
    path = tmp_path / "r.toml"
    path.write_text(RELAY)
    return path


@pytest.fixture
def relay_config(tmp_path: Path) -> Path:
    return write_relay_config(tmp_path)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_each_peer_has_its_role_channel_link_auth_and_store(relay_config: Path) -> None:
    config = load_config(relay_config)
    base = relay_config.parent
    assert config.several_peers
    a, c = config.peers
    assert (a.name, a.role, c.name, c.role) == ("a", "bob", "c", "alice")
    assert a.peer.listen == ("127.0.0.1", 7001) and a.peer.connect is None
    assert a.peer.io_timeout_s == 7.0 and c.peer.io_timeout_s == 60.0
    assert c.peer.connect == ("127.0.0.1", 7002)
    # a's link and auth are the top-level tables, c has its own
    assert isinstance(a.link, SimulatedLinkConfig) and isinstance(c.link, SimulatedLinkConfig)
    assert (a.link.fibre_port, c.link.fibre_port, c.link.fiber_km) == (7331, 7332, 10.0)
    assert a.auth.psk_file == base / "a.psk" and c.auth.psk_file == base / "c.psk"
    # a store per link: under store.directory by the peer's name, or where it says
    assert a.store_directory == base / "stores" / "a"
    assert c.store_directory == base / "elsewhere" / "c"
    # each link's view is a single-peer config of that link
    view = config.for_peer(c)
    assert view.node.name == "r" and view.node.role == "alice" and view.peer.name == "c"
    assert view.store.directory == base / "elsewhere" / "c" and view.auth == c.auth
    assert view.peers == (c,) and not view.several_peers
    assert view.delivery is None and config.delivery is None


def test_delivery_is_bound_to_the_link_it_names(relay_config: Path) -> None:
    _edit(
        relay_config,
        '[store]\ndirectory = "stores"\n',
        '[store]\ndirectory = "stores"\n' + DELIVERY,
    )
    config = load_config(relay_config)
    a, c = config.peers
    assert config.delivery_link() == c
    assert config.for_peer(c).delivery == config.delivery is not None
    assert config.for_peer(a).delivery is None


def test_the_single_peer_form_is_a_list_of_one(relay_config: Path) -> None:
    path = relay_config.parent / "single.toml"
    path.write_text(
        '[node]\nname = "r"\nrole = "bob"\n\n[peer]\nname = "a"\nlisten = "127.0.0.1:7001"\n'
        + RELAY[RELAY.index("[link]") :]
    )
    config = load_config(path)
    assert not config.several_peers
    (link,) = config.peers
    assert (link.name, link.role, link.peer) == ("a", "bob", config.peer)
    # unchanged store directory: no per-peer subdirectory for an existing node
    assert link.store_directory == config.store.directory == relay_config.parent / "stores"
    assert config.for_peer(link) == config


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        # unknown keys, with the entry's index
        ('connect = "127.0.0.1:7002"', 'connect_to = "127.0.0.1:7002"', "peers[1]", "exactly one"),
        ("io_timeout_s = 7.0", "io_timeout_s = 7.0\nport = 3", "peers[0].port", "unknown"),
        (
            'connect = "127.0.0.1:7002"',
            'connect = "127.0.0.1:7002"\nconect = 1',
            "peers[1].conect",
            "unknown",
        ),
        ("fiber_km = 10.0", "fiber_km = 10.0\nfibre_km = 3.0", "peers[1].link.fibre_km", "unknown"),
        ('psk_file = "c.psk"', 'psk_file = "c.psk"\npsk = "x"', "peers[1].auth.psk", "unknown"),
        ('name = "c"', 'name = "a"', "peers[1].name", "not used by another peer"),
        ('name = "c"', 'name = "../c"', "peers[1].name", "letters, digits"),
        ('role = "bob"', 'role = "charlie"', "peers[0].role", "'alice', 'bob'"),
        (
            "io_timeout_s = 7.0",
            'io_timeout_s = 7.0\nconnect = "127.0.0.1:7003"',
            "peers[0]",
            "exactly one of listen",
        ),
        ('name = "r"\n', 'name = "r"\nrole = "bob"\n', "node.role", "set per link"),
        (
            'connect = "127.0.0.1:7002"',
            'listen = "127.0.0.1:7001"',
            "peers[1].listen",
            "no other peer listens on",
        ),
        ('name = "r"\n', 'name = "r"\n\n[peer]\nname = "x"\n', "peer", "not both"),
        (
            'store_directory = "elsewhere/c"',
            'store_directory = "stores/a"',
            "peers[1].store_directory",
            "this link alone",
        ),
        (
            '[link]\nbackend = "simulated"',
            '[linkx]\nbackend = "simulated"',
            "peers[0].link",
            "top-level",
        ),
    ],
)
def test_peer_mistakes_name_file_key_and_fix(
    relay_config: Path, old: str, new: str, key: str, expected: str
) -> None:
    _edit(relay_config, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(relay_config)
    text = str(info.value)
    assert str(relay_config) in text
    assert info.value.key == key, text
    assert expected in text


@pytest.mark.parametrize(
    ("peer_line", "expected"),
    [("", "with several peers, delivery serves one link"), ('peer = "b"\n', "'a', 'c'")],
)
def test_delivery_must_name_one_configured_peer(
    relay_config: Path, peer_line: str, expected: str
) -> None:
    _edit(
        relay_config,
        '[store]\ndirectory = "stores"\n',
        '[store]\ndirectory = "stores"\n' + DELIVERY.replace('peer = "c"\n', peer_line),
    )
    with pytest.raises(ConfigError) as info:
        load_config(relay_config)
    assert info.value.key == "delivery.peer"
    assert expected in str(info.value)


def test_an_empty_peer_list_is_refused(relay_config: Path) -> None:
    relay_config.write_text('peers = []\n[node]\nname = "r"\n' + RELAY[RELAY.index("[link]") :])
    with pytest.raises(ConfigError) as info:
        load_config(relay_config)
    assert info.value.key == "peers" and "at least one" in str(info.value)
