"""``[relay]`` (``qkdnode.config.relay``) read through the real loader: the chain demo's configs
load as intended, and every mistake is refused naming its dotted key."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from typing import Any

import pytest

from qkdnode.config import load_config
from qkdnode.config.load import parse_config
from qkdnode.config.relay import (
    DEFAULT_RELAY_PREBIND_KEYS,
    MAX_PAD_TARGET_BITS,
    MAX_RELAY_PREBIND_KEYS,
    RelaySection,
    RemoteNode,
)
from qkdnode.demo.chain import ChainLayout, prepare_chain
from qkdnode.errors import ConfigError

Data = dict[str, Any]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> ChainLayout:
    return prepare_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="module")
def chain_with_middle_sae(tmp_path_factory: pytest.TempPathFactory) -> ChainLayout:
    return prepare_chain(tmp_path_factory.mktemp("chain-middle"), middle_sae=True)


def data_of(layout: ChainLayout, node: str) -> Data:
    return copy.deepcopy(tomllib.loads(layout.config(node).read_text(encoding="utf-8")))


def refused(layout: ChainLayout, node: str, change: Callable[[Data], None]) -> ConfigError:
    data = data_of(layout, node)
    change(data)
    with pytest.raises(ConfigError) as caught:
        parse_config(data, layout.config(node))
    assert caught.value.file == str(layout.config(node))
    return caught.value


def accepted(layout: ChainLayout, node: str, change: Callable[[Data], None]) -> RelaySection:
    data = data_of(layout, node)
    change(data)
    relay = parse_config(data, layout.config(node)).relay
    assert relay is not None
    return relay


def remote(data: Data, index: int = 0) -> Data:
    entry: Data = data["relay"]["remote"][index]
    return entry


# ---- a valid chain ----------------------------------------------------------------------------


def test_the_chain_demo_configs_load_with_their_routes(chain: ChainLayout) -> None:
    a, r, c = (load_config(chain.config(name)) for name in ("A", "R", "C"))
    assert a.relay is not None
    assert r.relay is not None
    assert c.relay is not None
    assert a.relay.remotes == {"C": RemoteNode(node="C", route=("A", "R", "C"), saes=("sae-b",))}
    assert c.relay.remotes == {"A": RemoteNode(node="A", route=("C", "R", "A"), saes=("sae-a",))}
    assert r.relay.remotes == {}
    for relay in (a.relay, r.relay, c.relay):
        assert relay.pad_target_bits == chain.pad_target_bits
        assert relay.timeout_s == 5.0
        assert relay.retransmit_s == 1.0
        assert relay.prebind_keys == DEFAULT_RELAY_PREBIND_KEYS
    assert a.relay.sae_nodes == {"sae-b": "C"}
    assert c.relay.sae_nodes == {"sae-a": "A"}
    assert r.relay.sae_nodes == {}
    # each end's delivery hands out its own half of its link's keys as master
    assert a.delivery is not None and a.delivery.master_parity == 0
    assert c.delivery is not None and c.delivery.master_parity == 1


def test_route_to_sae_names_the_route_of_the_node_serving_it(chain: ChainLayout) -> None:
    a = load_config(chain.config("A")).relay
    c = load_config(chain.config("C")).relay
    r = load_config(chain.config("R")).relay
    assert a is not None and c is not None and r is not None
    assert a.route_to_sae("sae-b") == ("A", "R", "C")
    assert c.route_to_sae("sae-a") == ("C", "R", "A")
    for section, sae in ((a, "sae-a"), (a, "sae-x"), (c, "sae-b"), (r, "sae-a"), (r, "sae-b")):
        assert section.route_to_sae(sae) is None  # local, unknown, or no remotes at all


def test_several_remotes_each_with_its_saes_and_a_direct_neighbour(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        data["relay"]["remote"] = [
            {"node": "C", "via": ["R"], "saes": ["sae-c1", "sae-c2"]},
            {"node": "D", "via": ["R", "C"], "saes": ["sae-d"]},
            {"node": "R", "saes": ["sae-r"]},  # the neighbour itself, no via
        ]
        data["relay"]["timeout_s"] = 0.25
        data["relay"]["retransmit_s"] = 0.5
        data["relay"]["prebind_keys"] = 0

    relay = accepted(chain, "A", change)
    assert relay.route_to_sae("sae-c2") == ("A", "R", "C")
    assert relay.route_to_sae("sae-d") == ("A", "R", "C", "D")
    assert relay.route_to_sae("sae-r") == ("A", "R")
    assert relay.sae_nodes == {"sae-c1": "C", "sae-c2": "C", "sae-d": "D", "sae-r": "R"}
    assert (relay.timeout_s, relay.retransmit_s, relay.prebind_keys) == (0.25, 0.5, 0)


def test_a_route_of_eight_nodes_is_the_longest(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        remote(data)["via"] = ["R", "N1", "N2", "N3", "N4", "N5"]

    relay = accepted(chain, "A", change)
    assert relay.route_to_sae("sae-b") == ("A", "R", "N1", "N2", "N3", "N4", "N5", "C")

    def longer(data: Data) -> None:
        remote(data)["via"] = ["R", "N1", "N2", "N3", "N4", "N5", "N6"]

    assert refused(chain, "A", longer).key == "relay.remote[0].via"


# ---- refusals, each naming its dotted key ------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "via", "key"),
    [
        ("C", ["X"], "relay.remote[0].via"),  # first hop is not a peer
        ("C", ["C2", "R"], "relay.remote[0].via"),  # a peer, but not first
        ("C", [], "relay.remote[0].node"),  # the node itself is not a peer
    ],
)
def test_the_first_hop_must_be_a_configured_peer(
    chain: ChainLayout, node: str, via: list[str], key: str
) -> None:
    def change(data: Data) -> None:
        remote(data)["node"] = node
        remote(data)["via"] = via

    error = refused(chain, "A", change)
    assert error.key == key
    assert "'R'" in error.expected  # names the configured peers


@pytest.mark.parametrize(
    ("node", "via"),
    [
        ("C", ["R", "R"]),  # a node twice
        ("C", ["R", "X", "R"]),
        ("C", ["R", "C"]),  # the remote node on its own route
        ("C", ["R", "A"]),  # this node on the route
        ("A", ["R"]),  # this node as the remote
    ],
)
def test_a_route_repeating_a_node_or_naming_this_node_is_refused(
    chain: ChainLayout, node: str, via: list[str]
) -> None:
    def change(data: Data) -> None:
        remote(data)["node"] = node
        remote(data)["via"] = via

    assert refused(chain, "A", change).key == "relay.remote[0].via"


def test_a_remote_sae_also_served_locally_is_refused(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        remote(data)["saes"] = ["sae-b", "sae-a"]  # sae-a is A's own SAE

    error = refused(chain, "A", change)
    assert error.key == "relay.remote[0].saes"
    assert "sae-a" in error.expected


@pytest.mark.parametrize(
    "remotes",
    [
        [{"node": "C", "via": ["R"], "saes": ["sae-b", "sae-b"]}],
        [
            {"node": "C", "via": ["R"], "saes": ["sae-b"]},
            {"node": "D", "via": ["R"], "saes": ["sae-d", "sae-b"]},
        ],
    ],
)
def test_a_remote_sae_listed_twice_is_refused(chain: ChainLayout, remotes: list[Data]) -> None:
    def change(data: Data) -> None:
        data["relay"]["remote"] = remotes

    error = refused(chain, "A", change)
    assert error.key == f"relay.remote[{len(remotes) - 1}].saes"
    assert "sae-b" in error.expected


def test_a_remote_node_listed_twice_is_refused(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        data["relay"]["remote"] = [
            {"node": "C", "via": ["R"], "saes": ["sae-b"]},
            {"node": "C", "via": ["R"], "saes": ["sae-c"]},
        ]

    assert refused(chain, "A", change).key == "relay.remote[1].node"


def test_a_remote_without_saes_is_refused(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        remote(data)["saes"] = []

    assert refused(chain, "A", change).key == "relay.remote[0].saes"


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("node", "C D", "relay.remote[0].node"),
        ("node", "", "relay.remote[0].node"),
        ("node", "C/D", "relay.remote[0].node"),
        ("node", "n" * 33, "relay.remote[0].node"),
        ("node", 7, "relay.remote[0].node"),
        ("via", ["R", "bad name"], "relay.remote[0].via"),
        ("via", ["R", "é"], "relay.remote[0].via"),
        ("via", "R", "relay.remote[0].via"),
        ("saes", "sae-b", "relay.remote[0].saes"),
    ],
)
def test_bad_names_on_a_route_are_refused(
    chain: ChainLayout, field: str, value: object, key: str
) -> None:
    def change(data: Data) -> None:
        remote(data)[field] = value

    assert refused(chain, "A", change).key == key


def test_a_node_name_unusable_on_a_route_is_refused_with_relay(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        data["node"]["name"] = "node A"

    assert refused(chain, "A", change).key == "node.name"


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("relay", "relay.pad_target_bit"),
        ("remote", "relay.remote[0].sae"),
    ],
)
def test_unknown_keys_are_refused(chain: ChainLayout, where: str, key: str) -> None:
    def change(data: Data) -> None:
        table = data["relay"] if where == "relay" else remote(data)
        table[key.rsplit(".", 1)[1]] = 1

    error = refused(chain, "A", change)
    assert error.key == key
    assert "unknown" in error.expected


def test_a_remote_that_is_not_a_table_is_refused(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        data["relay"]["remote"] = ["C"]

    assert refused(chain, "A", change).key == "relay.remote"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prebind_keys", -1),
        ("prebind_keys", MAX_RELAY_PREBIND_KEYS + 1),
        ("prebind_keys", 1.5),
        ("pad_target_bits", 4095),
        ("pad_target_bits", 0),
        ("pad_target_bits", MAX_PAD_TARGET_BITS + 1),
        ("timeout_s", 0),
        ("timeout_s", -1.0),
        ("timeout_s", "5"),
        ("retransmit_s", 0.001),
        ("retransmit_s", 61.0),
    ],
)
def test_numbers_out_of_range_are_refused(chain: ChainLayout, key: str, value: object) -> None:
    def change(data: Data) -> None:
        data["relay"][key] = value

    assert refused(chain, "A", change).key == f"relay.{key}"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prebind_keys", 0),
        ("prebind_keys", MAX_RELAY_PREBIND_KEYS),
        ("pad_target_bits", 4096),
        ("pad_target_bits", MAX_PAD_TARGET_BITS),
        ("timeout_s", 0.001),
        ("retransmit_s", 0.01),
        ("retransmit_s", 60),
    ],
)
def test_numbers_at_their_bounds_are_accepted(chain: ChainLayout, key: str, value: object) -> None:
    def change(data: Data) -> None:
        data["relay"][key] = value

    assert getattr(accepted(chain, "A", change), key) == value


@pytest.mark.parametrize(("node", "parity"), [("A", 1), ("C", 0)])
def test_delivery_master_parity_must_match_the_role_with_relay(
    chain: ChainLayout, node: str, parity: int
) -> None:
    def change(data: Data) -> None:
        data["delivery"]["master_parity"] = parity

    error = refused(chain, node, change)
    assert error.key == "delivery.master_parity"
    assert error.expected.startswith(str(1 - parity))

    def without_relay(data: Data) -> None:
        change(data)
        del data["relay"]

    data = data_of(chain, node)
    without_relay(data)
    assert parse_config(data, chain.config(node)).delivery is not None  # fine without [relay]


def test_middle_node_delivery_parity_follows_its_delivery_link(
    chain_with_middle_sae: ChainLayout,
) -> None:
    layout = chain_with_middle_sae
    r = load_config(layout.config("R"))  # Bob on its link with A, which delivery serves
    assert r.delivery is not None and r.delivery.master_parity == 1
    assert r.relay is not None

    def change(data: Data) -> None:
        data["delivery"]["master_parity"] = 0

    assert refused(layout, "R", change).key == "delivery.master_parity"


def test_a_peer_name_unusable_on_a_route_is_refused_with_relay(chain: ChainLayout) -> None:
    # a peer name may be up to 64 characters, a node name on a route up to 32
    def change(data: Data) -> None:
        data["peers"][1]["name"] = "C" * 33

    error = refused(chain, "R", change)
    assert error.key == "peers[1].name"
    assert "relay" in error.expected

    def without_relay(data: Data) -> None:
        change(data)
        del data["relay"]

    data = data_of(chain, "R")
    without_relay(data)
    assert parse_config(data, chain.config("R")).peers[1].name == "C" * 33


def test_a_remote_sae_also_a_peer_sae_is_refused(chain: ChainLayout) -> None:
    def change(data: Data) -> None:
        data["delivery"]["peer_saes"] = ["sae-b"]  # also C's SAE in [[relay.remote]]

    error = refused(chain, "A", change)
    assert error.key in ("relay.remote[0].saes", "delivery.peer_saes")
