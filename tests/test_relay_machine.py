"""The relay machine: a relay end to end, every message at every state, duplicates and replays,
refusals, aborts, retransmission after a restart, and no secret in any repr."""

from __future__ import annotations

import dataclasses
import itertools
import uuid

import pytest

from qkdnode.errors import ProtocolError
from qkdnode.relay.events import (
    AbortRequested,
    Direction,
    PadRange,
    PeerMessage,
    Position,
    RelayConfig,
    RelayFinished,
    RelayRefused,
    RelayRequested,
    RelayStarted,
    RelayState,
    RetransmitDue,
    SaveRelay,
    SendRelay,
)
from qkdnode.relay.machine import _TRANSITIONS, RelayMachine
from qkdnode.relay.messages import Decide, Forward, Outcome, Prepared, RelayMessage
from qkdnode.relay.payload import confirmation_tag
from tests.helpers_relay import SAE, RelayNet


def _request(route: tuple[str, ...] = ("A", "R", "C"), key_bits: int = 256) -> RelayRequested:
    return RelayRequested(
        route=route, master_sae_id=SAE[route[0]], slave_sae_id=SAE[route[-1]], key_bits=key_bits
    )


def _start(net: RelayNet, route: tuple[str, ...] = ("A", "R", "C")) -> uuid.UUID:
    effects = net.feed(route[0], _request(route))
    started = [e for e in effects if isinstance(e, RelayStarted)]
    assert len(started) == 1
    return started[0].key_id


# ---- a relay end to end ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "route", [("A", "R", "C"), ("C", "R", "A"), ("A", "R"), ("R", "C")], ids="-".join
)
def test_a_relay_delivers_the_same_key_at_both_ends_exactly_once(route: tuple[str, ...]) -> None:
    net = RelayNet(seed=1)
    key_id = _start(net, route)
    net.run(retransmit_rounds=0)
    assert set(net.states(key_id).values()) == {RelayState.COMMITTED}
    assert set(net.states(key_id)) == set(route)
    origin, terminal = net.delivered[route[0]], net.delivered[route[-1]]
    assert origin[key_id] == terminal[key_id] and len(origin[key_id]) == 32
    middles = route[1:-1]
    assert all(not net.delivered[n] and not net.record(n, key_id).key for n in middles)
    # 8 messages for two hops (Forward, Prepared, Decide, Outcome on each), 4 for one
    assert len(net.sent) == 4 * (len(route) - 1)


def test_every_store_write_comes_before_the_message_that_announces_it() -> None:
    net = RelayNet(seed=2)
    _start(net)
    net.run(retransmit_rounds=0)
    assert len(net.calls) == 9  # the request and eight deliveries
    for name, effects in net.calls:
        kinds = [type(e) for e in effects]
        first = effects[0]
        if name == "R" and isinstance(first, SendRelay) and isinstance(first.message, Prepared):
            continue  # a middle node passes Prepared on: nothing of its own to store
        assert kinds[0] is SaveRelay, (name, kinds)  # the write first, then what announces it


def test_each_hop_spends_exactly_one_pad_bit_per_relayed_bit() -> None:
    net = RelayNet(seed=3)
    key_id = _start(net)
    net.run()
    payload = 256 + 256
    for sender, receiver in (("A", "R"), ("R", "C")):
        out = net.stores[sender].stream(receiver, Direction.OUT).spent
        into = net.stores[receiver].stream(sender, Direction.IN).spent
        assert out == into == [(0, payload, key_id)]
        assert net.stores[sender].next_offset_bits(receiver) == payload
    for sender, receiver in (("R", "A"), ("C", "R")):  # the other direction is untouched
        assert net.stores[sender].stream(receiver, Direction.OUT).spent == []


def test_the_pad_bits_are_erased_at_both_ends_of_each_hop() -> None:
    net = RelayNet(seed=4)
    _start(net)
    net.run()
    for sender, receiver in (("A", "R"), ("R", "C")):
        assert net.stores[sender].stream(receiver, Direction.OUT).material[:64] == bytes(64)
        assert net.stores[receiver].stream(sender, Direction.IN).material[:64] == bytes(64)


def test_the_confirmation_tag_binds_key_id_route_and_key() -> None:
    key_id, route, key, confirmation = uuid.UUID(int=5), ("A", "C"), bytes(32), bytes(range(32))
    tag = confirmation_tag(key_id, route, key, confirmation)
    assert len(tag) == 16
    assert confirmation_tag(uuid.UUID(int=6), route, key, confirmation) != tag
    assert confirmation_tag(key_id, ("A", "R", "C"), key, confirmation) != tag
    assert confirmation_tag(key_id, route, b"\x01" + key[1:], confirmation) != tag


# ---- aborts and refusals -----------------------------------------------------------------------


def test_a_pad_that_differs_at_one_end_aborts_the_relay_at_both_ends() -> None:
    net = RelayNet(seed=5)
    net.stores["C"].corrupt("R", Direction.IN, 3)
    key_id = _start(net)
    net.run()
    assert set(net.states(key_id).values()) == {RelayState.ABORTED}
    assert "confirmation tag differs" in net.record("A", key_id).reason
    assert not net.delivered["A"] and not net.delivered["C"]
    assert not net.record("C", key_id).key and not net.record("A", key_id).key
    # the consumed pad bits stay spent on both hops
    assert net.stores["A"].next_offset_bits("R") == 512
    assert net.stores["R"].next_offset_bits("C") == 512


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("slave", "the slave SAE is not served here"),
        ("pad_in", "the pad bits from R are not here yet"),
        ("pad_out", "the pad stream to C holds too few bits"),
    ],
)
def test_a_refusal_downstream_aborts_everywhere_and_keeps_the_pad_spent(
    setup: str, reason: str
) -> None:
    net = RelayNet(seed=6, pad_bytes=64)  # each stream holds exactly one relay of 256 bits
    if setup == "slave":
        store = net.stores["C"]
        net.machines["C"] = RelayMachine(
            dataclasses.replace(net.config("C"), local_sae_ids=frozenset({"someone-else"})),
            store=store,
            pads=store,
            random_bytes=net.rng.randbytes,
        )
    elif setup == "pad_in":
        net.stores["C"].stream("R", Direction.IN).material.clear()
    else:
        net.stores["R"].stream("C", Direction.OUT).material.clear()
    key_id = _start(net)
    net.run(retransmit_rounds=0)
    assert net.record("A", key_id).state is RelayState.ABORTED
    assert net.record("A", key_id).reason == reason
    assert set(net.states(key_id).values()) == {RelayState.ABORTED}
    assert not net.delivered["A"] and not net.delivered["C"]
    assert net.stores["A"].stream("R", Direction.OUT).spent == [(0, 512, key_id)]
    refusing = "R" if setup == "pad_out" else "C"
    upstream = "A" if refusing == "R" else "R"
    assert net.stores[refusing].stream(upstream, Direction.IN).spent == [(0, 512, key_id)]


def test_a_request_the_pad_cannot_pay_is_refused_without_storing_anything() -> None:
    net = RelayNet(seed=7, pad_bytes=63)
    effects = net.feed("A", _request())
    assert effects == [
        RelayRefused(route=("A", "R", "C"), reason="the pad stream to R holds too few bits")
    ]
    assert net.stores["A"].records() == {}


def test_the_origin_gives_up_only_until_it_has_decided() -> None:
    net = RelayNet(seed=8)
    key_id = _start(net)
    for _ in range(3):  # Forward to R, to C, Prepared to R: A still pending
        net.deliver_one()
    assert net.feed("A", AbortRequested(key_id=key_id))[0] == SaveRelay(
        record=dataclasses.replace(
            net.record("A", key_id),
            state=RelayState.ABORTING,
            key=b"",
            reason="abandoned by the origin",
        )
    )
    net.run()
    assert set(net.states(key_id).values()) == {RelayState.ABORTED}
    assert not net.delivered["A"] and not net.delivered["C"]
    # after a decision to commit, a request to give up changes nothing
    net2 = RelayNet(seed=9)
    key2 = _start(net2)
    for _ in range(4):
        net2.deliver_one()
    assert net2.record("A", key2).state is RelayState.COMMITTING
    assert net2.feed("A", AbortRequested(key_id=key2)) == []
    assert net2.feed("A", AbortRequested(key_id=uuid.UUID(int=1))) == []


def test_an_abort_that_arrives_before_the_key_leaves_a_tombstone_that_refuses_it_later() -> None:
    net = RelayNet(seed=10)
    key_id = _start(net)
    forward_to_r = net.queue.popleft()  # held back
    net.feed("A", AbortRequested(key_id=key_id))
    net.run(retransmit_rounds=0)
    assert net.record("R", key_id).state is RelayState.ABORTED
    assert net.records(key_id)["C"] is None
    assert net.record("A", key_id).state is RelayState.ABORTED
    # the late Forward is answered with the outcome, prepares nothing, and its range is spent
    effects = net.feed("R", PeerMessage(peer="A", message=forward_to_r.message))
    sends = [e.message for e in effects if isinstance(e, SendRelay)]
    assert len(sends) == 1 and isinstance(sends[0], Outcome) and not sends[0].committed
    assert net.stores["R"].stream("A", Direction.IN).spent == [(0, 512, key_id)]
    assert net.records(key_id)["C"] is None


# ---- restarts and retransmission ---------------------------------------------------------------


def test_a_restart_at_any_point_resumes_from_the_store_alone() -> None:
    for stop_after in range(9):
        net = RelayNet(seed=11)
        key_id = _start(net)
        for _ in range(stop_after):
            if net.queue:
                net.deliver_one()
        net.queue.clear()  # everything in flight is lost
        for name in net.chain:  # every node restarts: a fresh machine over its store
            net.machines[name] = net.machine(name)
        net.run()
        assert net.states(key_id) == dict.fromkeys(net.chain, RelayState.COMMITTED), stop_after
        assert net.delivered["A"][key_id] == net.delivered["C"][key_id]


def test_retransmission_resends_what_each_state_owes() -> None:
    net = RelayNet(seed=12)
    key_id = _start(net)
    owed = []
    for _ in range(8):
        net.deliver_one()
        resent = {
            name: [
                type(e.message).__name__
                for e in net.machines[name].receive(RetransmitDue())
                if isinstance(e, SendRelay)
            ]
            for name in net.chain
        }
        owed.append(resent)
    assert owed[0] == {"A": ["Forward"], "R": ["Forward"], "C": []}
    assert owed[1] == {"A": ["Forward"], "R": ["Forward"], "C": ["Prepared"]}
    assert owed[3] == {"A": ["Decide"], "R": ["Forward"], "C": ["Prepared"]}
    assert owed[5] == {"A": ["Decide"], "R": ["Decide"], "C": []}
    assert owed[7] == {"A": [], "R": [], "C": []}
    assert net.record("A", key_id).state is RelayState.COMMITTED


# ---- every message at every state --------------------------------------------------------------


def _snapshots(seed: int, *, corrupt: bool) -> list[RelayNet]:
    """The network after each delivery of a relay (committed, or aborted by its tag)."""
    net = RelayNet(seed=seed)
    if corrupt:
        net.stores["C"].corrupt("R", Direction.IN, 0)
    _start(net)
    forks = [net.fork()]
    while net.queue:
        net.deliver_one()
        forks.append(net.fork())
    return forks


def _candidates(net: RelayNet, key_id: uuid.UUID) -> list[tuple[str, RelayMessage]]:
    """Every message kind, in every variant, that a neighbour could send about the relay."""
    route = ("A", "R", "C")
    forward = next(w.message for w in net.sent if isinstance(w.message, Forward))
    forward_rc = [w.message for w in net.sent if isinstance(w.message, Forward)][-1]
    altered = dataclasses.replace(forward, ciphertext=bytes(len(forward.ciphertext)))
    messages: list[RelayMessage] = [
        forward,
        forward_rc,
        altered,
        Prepared(key_id=key_id, route=route, tag=bytes(16)),
        Decide(key_id=key_id, route=route, commit=True),
        Decide(key_id=key_id, route=route, commit=False),
        Outcome(key_id=key_id, route=route, committed=True),
        Outcome(key_id=key_id, route=route, committed=False, reason="no"),
    ]
    prepared = [w.message for w in net.sent if isinstance(w.message, Prepared)]
    messages += prepared[:1]
    return [(peer, m) for m in messages for peer in ("A", "R", "C")]


@pytest.mark.parametrize("corrupt", [False, True], ids=["commit", "abort"])
def test_every_message_at_every_state_is_handled_or_refused_without_a_change(
    corrupt: bool,
) -> None:
    seen: set[tuple[str, RelayState | None, str]] = set()
    refused = handled = 0
    for snapshot in _snapshots(13, corrupt=corrupt):
        key_id = next(iter(snapshot.stores["A"].records()))
        for target in snapshot.chain:
            record = snapshot.stores[target].relay(key_id)
            state = record.state if record else None
            for peer, message in _candidates(snapshot, key_id):
                if peer == target:
                    continue
                net = snapshot.fork()
                before = net.snapshot()
                seen.add((target, state, type(message).__name__))
                try:
                    effects = net.feed(target, PeerMessage(peer=peer, message=message))
                except ProtocolError:
                    refused += 1
                    assert net.snapshot() == before, (target, state, message)
                    continue
                handled += 1
                assert all(isinstance(e, SaveRelay | SendRelay | RelayFinished) for e in effects)
    assert refused > 50 and handled > 50
    # every reachable state of every node met every message kind
    for target, kind in itertools.product(("A", "R", "C"), ("Forward", "Decide", "Outcome")):
        assert any(t == target and k == kind for t, _, k in seen)


def test_the_transition_table_decides_exactly_which_messages_are_accepted() -> None:
    """For each (position, state, message type): accepted iff in the table, from the right side."""
    for snapshot in _snapshots(14, corrupt=False) + _snapshots(15, corrupt=True):
        key_id = next(iter(snapshot.stores["A"].records()))
        for target in snapshot.chain:
            record = snapshot.stores[target].relay(key_id)
            state = record.state if record else None
            position = {"A": Position.ORIGIN, "R": Position.MIDDLE, "C": Position.TERMINAL}
            for kind in (Forward, Prepared, Decide, Outcome):
                downstream_bound = kind in (Forward, Decide)
                index = snapshot.chain.index(target)
                sender_index = index - 1 if downstream_bound else index + 1
                in_table = (position[target], state, kind) in _TRANSITIONS
                if not 0 <= sender_index < 3:
                    assert not in_table
                    continue
                sender = snapshot.chain[sender_index]
                messages = [m for p, m in _candidates(snapshot, key_id) if type(m) is kind]
                outcomes = set()
                for message in messages:
                    net = snapshot.fork()
                    try:
                        net.feed(target, PeerMessage(peer=sender, message=message))
                        outcomes.add("accepted")
                    except ProtocolError as exc:
                        outcomes.add("refused by table" if exc.field == "type" else "refused")
                if not in_table:
                    assert outcomes == {"refused by table"}, (target, state, kind)
                else:
                    assert "refused by table" not in outcomes, (target, state, kind)


@pytest.mark.parametrize("corrupt", [False, True], ids=["commit", "abort"])
def test_a_replay_of_any_earlier_message_at_any_point_changes_no_outcome(corrupt: bool) -> None:
    clean = _snapshots(16, corrupt=corrupt)
    final = clean[-1]
    key_id = next(iter(final.stores["A"].records()))
    final.run()
    expected = final.states(key_id)
    for point, snapshot in enumerate(clean):
        for wire in list(snapshot.sent):
            net = snapshot.fork()
            net.feed(wire.target, PeerMessage(peer=wire.source, message=wire.message))
            net.run()
            states = net.states(key_id)
            assert states == expected, (point, wire.message)
            assert net.delivered["A"] == net.delivered["C"]


# ---- refusals that leave everything as it was --------------------------------------------------


def _net_after_forward() -> tuple[RelayNet, uuid.UUID, Forward]:
    net = RelayNet(seed=17)
    key_id = _start(net)
    wire = net.deliver_one()  # R stored and forwarded
    assert isinstance(wire.message, Forward)
    return net, key_id, wire.message


@pytest.mark.parametrize(
    ("target", "peer", "change", "field"),
    [
        ("R", "X", {}, "peer"),  # not a neighbour
        ("R", "C", {}, "route"),  # a Forward from downstream
        ("R", "A", {"route": ("A", "C")}, "route"),  # a route without this node
        ("R", "A", {"route": ("R", "A", "C")}, "route"),  # this node first: no upstream here
        ("R", "A", {"ciphertext": bytes(64)}, "key_id"),  # same key ID, other contents
        ("R", "A", {"pad_offset_bits": 8}, "key_id"),  # same key ID, other range
        ("R", "A", {"key_id": uuid.UUID(int=7)}, "pad_offset_bits"),  # a used range again
        ("R", "A", {"key_id": uuid.UUID(int=7), "pad_offset_bits": 256}, "pad_offset_bits"),
        ("A", "R", {}, "route"),  # a Forward to the origin
    ],
)
def test_a_bad_forward_is_refused_and_changes_nothing(
    target: str, peer: str, change: dict[str, object], field: str
) -> None:
    net, _, forward = _net_after_forward()
    before = net.snapshot()
    message = dataclasses.replace(forward, **change)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as caught:
        net.feed(target, PeerMessage(peer=peer, message=message))
    assert caught.value.field == field
    assert net.snapshot() == before
    # and the machine keeps working: the relay still completes
    net.run()
    assert net.delivered["A"] and net.delivered["A"] == net.delivered["C"]


def test_protocol_errors_name_no_secret() -> None:
    net, _, forward = _net_after_forward()
    message = dataclasses.replace(forward, ciphertext=bytes(64))
    with pytest.raises(ProtocolError) as caught:
        net.feed("R", PeerMessage(peer="A", message=message))
    assert forward.ciphertext.hex()[:16] not in str(caught.value)


def test_a_commit_for_an_unknown_relay_and_an_early_committed_outcome_are_refused() -> None:
    net = RelayNet(seed=18)
    decide = Decide(key_id=uuid.UUID(int=3), route=("A", "R", "C"), commit=True)
    with pytest.raises(ProtocolError, match="never prepared"):
        net.feed("R", PeerMessage(peer="A", message=decide))
    key_id = _start(net)
    outcome = Outcome(key_id=key_id, route=("A", "R", "C"), committed=True)
    with pytest.raises(ProtocolError, match="before any decision"):
        net.feed("A", PeerMessage(peer="R", message=outcome))
    assert net.stores["R"].records() == {}
    assert net.record("A", key_id).state is RelayState.PENDING


def test_a_request_that_does_not_start_here_is_a_shell_bug() -> None:
    net = RelayNet(seed=19)
    with pytest.raises(RuntimeError):
        net.feed("R", _request(("A", "R", "C")))
    with pytest.raises(ValueError):
        RelayRequested(route=("A", "R"), master_sae_id="", slave_sae_id="x", key_bits=256)


# ---- no secret in any repr ---------------------------------------------------------------------


def test_no_key_pad_or_tag_appears_in_any_repr() -> None:
    net = RelayNet(seed=20)
    key_id = _start(net)
    net.run()
    secrets = [net.delivered["A"][key_id]]
    for name in net.chain:
        for record in net.stores[name].records().values():
            secrets += [s for s in (record.key, record.tag) if s]
    for wire in net.sent:
        if isinstance(wire.message, Forward):
            secrets.append(wire.message.ciphertext)
        if isinstance(wire.message, Prepared):
            secrets.append(wire.message.tag)
    texts = [repr(e) for effects in net.effects.values() for e in effects]
    texts += [repr(w.message) for w in net.sent]
    texts += [repr(net.stores[n]) + repr(net.machines[n]) for n in net.chain]
    texts += [repr(PadRange(peer="R", direction=Direction.OUT, offset_bits=0, bits=8))]
    blob = "\n".join(texts)
    for secret in secrets:
        for start in range(0, len(secret) - 6, 6):
            window = secret[start : start + 6]
            assert window.hex() not in blob and repr(window)[2:-1] not in blob


def test_a_route_past_a_node_without_that_link_is_refused_there() -> None:
    net = RelayNet(seed=21)
    request = RelayRequested(
        route=("A", "R", "X"), master_sae_id="sae-a", slave_sae_id="sae-x", key_bits=256
    )
    effects = net.feed("A", request)
    key_id = next(e.key_id for e in effects if isinstance(e, RelayStarted))
    net.run(retransmit_rounds=0)
    assert net.record("A", key_id).reason == "no link to X"
    assert set(net.states(key_id).values()) == {RelayState.ABORTED}
    assert net.stores["R"].stream("A", Direction.IN).spent == [(0, 512, key_id)]


def test_a_request_for_a_master_sae_served_elsewhere_is_refused() -> None:
    net = RelayNet(seed=22)
    request = RelayRequested(
        route=("A", "R", "C"), master_sae_id="sae-c", slave_sae_id="sae-c", key_bits=256
    )
    assert net.feed("A", request) == [
        RelayRefused(route=("A", "R", "C"), reason="the master SAE is not served here")
    ]


def test_a_bad_configuration_or_request_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="node"):
        RelayConfig(node="a b", neighbours=frozenset(), local_sae_ids=frozenset())
    with pytest.raises(ValueError, match="own neighbour"):
        RelayConfig(node="A", neighbours=frozenset({"A"}), local_sae_ids=frozenset())
    with pytest.raises(ValueError, match="route"):
        RelayRequested(route=("A", "A"), master_sae_id="a", slave_sae_id="c", key_bits=256)
    with pytest.raises(ValueError, match="key_bits"):
        RelayRequested(route=("A", "C"), master_sae_id="a", slave_sae_id="c", key_bits=100)
