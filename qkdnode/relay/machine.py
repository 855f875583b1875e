"""The key relay protocol of one node, as a pure state machine (h11's ``_state.py`` shape).

``RelayMachine(config, store=..., pads=..., random_bytes=...)`` handles every relay through
this node, whatever its position on the route. ``receive(input)`` returns the effects the shell
must apply, in order, before the next input. The machine keeps nothing in memory between
inputs: it reads the relay records and the pad streams through read-only views
(``RelayStoreView``, ``PadView``) and changes them only through ``SaveRelay`` effects, each one
store transaction that always precedes the ``SendRelay`` announcing it. A crash therefore loses
nothing the protocol relies on, and a restarted node resumes from its store on the next
``RetransmitDue``. It does no I/O, reads no clock and draws randomness only from the injected
``random_bytes`` (key IDs, keys, confirmation keys).

Rules (docs/relay.md states them with the reasons):

- The origin draws the key K and a 256-bit confirmation key (r, s), allocates the payload's
  bits from its outgoing pad stream to the next node, stores the relay ``pending`` with K and
  the expected tag ``H_r(key_id, route, K) XOR s``, and sends ``Forward``.
- A middle node uses the incoming range, allocates as many bits of its outgoing stream, stores
  ``pending`` (no key) and forwards. The terminal stores ``prepared`` with K and answers
  ``Prepared(tag)``, which the middle nodes pass upstream.
- The origin commits on a matching tag (K deliverable there) or aborts, stores the decision and
  sends ``Decide``; each node stores it before passing it on; the terminal stores the outcome
  (K deliverable on commit, erased on abort) and answers ``Outcome``, which each node stores
  (finished) before passing it upstream.
- A middle or terminal node may refuse a first ``Forward`` (pad not yet there, next hop cannot
  pay, slave SAE not served here): it stores an ``aborted`` tombstone, counts the incoming range
  as spent, and answers ``Outcome(committed=False)``. The origin may abort until it decides
  (``AbortRequested``). Nothing else aborts a relay.
- Duplicates are recognised by key ID and answered from the stored state; a message no rule
  accepts raises ``ProtocolError`` and changes nothing (the machine stays usable). An input the
  shell should not have sent raises ``RuntimeError``.
"""

from __future__ import annotations

import dataclasses
import hmac
import uuid
from collections.abc import Callable
from typing import Final

from qkdnode.errors import ProtocolError
from qkdnode.relay.events import (
    AbortRequested,
    Direction,
    Effect,
    Input,
    PadRange,
    PadSpend,
    PadView,
    PeerMessage,
    Position,
    RelayConfig,
    RelayFinished,
    RelayRecord,
    RelayRefused,
    RelayRequested,
    RelayStarted,
    RelayState,
    RelayStoreView,
    RetransmitDue,
    SaveRelay,
    SendRelay,
)
from qkdnode.relay.messages import (
    CONFIRMATION_KEY_BITS,
    Decide,
    Forward,
    Outcome,
    Prepared,
    RelayMessage,
    payload_bits,
)
from qkdnode.relay.payload import ciphertext_digest, confirmation_tag, one_time_pad

_KEY_ID_DRAWS: Final = 4


Handler = Callable[["RelayMachine", "RelayRecord | None", "RelayMessage"], None]


class RelayMachine:
    """Every relay through one node (see the module docstring for the rules)."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        store: RelayStoreView,
        pads: PadView,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self.config = config
        self._store = store
        self._pads = pads
        self._random_bytes = random_bytes
        self._out: list[Effect] = []

    def __repr__(self) -> str:
        return f"RelayMachine(node={self.config.node})"

    @property
    def node(self) -> str:
        return self.config.node

    # ---- input ------------------------------------------------------------------------------
    def receive(self, event: Input) -> list[Effect]:
        """Apply one input; return the effects to apply, in order. A ``ProtocolError`` (a
        neighbour's message no rule accepts) or ``RuntimeError`` returns no effect at all."""
        self._out = []
        try:
            match event:
                case RelayRequested():
                    self._request(event)
                case PeerMessage():
                    self._peer_message(event)
                case RetransmitDue():
                    self._retransmit()
                case AbortRequested(key_id=key_id):
                    self._abort_requested(key_id)
                case _:
                    raise RuntimeError(f"not a relay input: {type(event).__name__}")
        except BaseException:
            self._out = []
            raise
        out, self._out = self._out, []
        return out

    def _peer_message(self, event: PeerMessage) -> None:
        message, peer = event.message, event.peer
        name = type(message).__name__
        if peer not in self.config.neighbours:
            raise ProtocolError(f"{name} from {peer!r}, which is not a neighbour", field="peer")
        route = message.route
        if self.node not in route:
            raise ProtocolError(f"{name}: the route does not name this node", field="route")
        index = route.index(self.node)
        position = _position(index, len(route))
        downstream_bound = isinstance(message, Forward | Decide)
        if downstream_bound:
            expected = route[index - 1] if index > 0 else None
        else:
            expected = route[index + 1] if index + 1 < len(route) else None
        if peer != expected:
            side = "upstream" if downstream_bound else "downstream"
            raise ProtocolError(
                f"{name} from {peer!r}, which is not this node's {side} neighbour on the route",
                field="route",
            )
        record = self._store.relay(message.key_id)
        if record is not None and (record.route != route or record.position is not position):
            raise ProtocolError(f"{name}: key ID known with another route", field="key_id")
        state = record.state if record is not None else None
        handler = _TRANSITIONS.get((position, state, type(message)))
        if handler is None:
            where = state.value if state is not None else "unknown relay"
            raise ProtocolError(f"{name} not valid at the {position.value} ({where})", field="type")
        handler(self, record, message)

    # ---- origin: request, confirmation, decision ----------------------------------------------
    def _request(self, event: RelayRequested) -> None:
        route = event.route
        if route[0] != self.node:
            raise RuntimeError("a relay starts at its origin: the route must begin here")
        span, refusal = self._outgoing_span(route[1], payload_bits(event.key_bits))
        if event.master_sae_id not in self.config.local_sae_ids:
            refusal = "the master SAE is not served here"
        if refusal:
            self._out.append(RelayRefused(route=route, reason=refusal))
            return
        assert span is not None
        following = route[1]
        key_id = self._new_key_id()
        key = self._random_bytes(event.key_bits // 8)
        confirmation_key = self._random_bytes(CONFIRMATION_KEY_BITS // 8)
        forward = Forward(
            key_id=key_id,
            route=route,
            master_sae_id=event.master_sae_id,
            slave_sae_id=event.slave_sae_id,
            key_bits=event.key_bits,
            pad_offset_bits=span.offset_bits,
            ciphertext=one_time_pad(key + confirmation_key, self._pads.pad(span)),
        )
        record = RelayRecord(
            key_id=key_id,
            route=route,
            position=Position.ORIGIN,
            master_sae_id=event.master_sae_id,
            slave_sae_id=event.slave_sae_id,
            key_bits=event.key_bits,
            state=RelayState.PENDING,
            key=key,
            tag=confirmation_tag(key_id, route, key, confirmation_key),
            pad_out=span,
            forward_out=forward,
        )
        self._save(record, PadSpend(range=span, used=True))
        self._send(following, forward)
        self._out.append(RelayStarted(key_id=key_id, route=route))

    def _new_key_id(self) -> uuid.UUID:
        for _ in range(_KEY_ID_DRAWS):
            key_id = uuid.UUID(bytes=self._random_bytes(16), version=4)
            if self._store.relay(key_id) is None:
                return key_id
        raise RuntimeError("the injected randomness repeats key IDs")

    def _origin_prepared(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is not None and isinstance(message, Prepared)
        if hmac.compare_digest(record.tag, message.tag):
            self._decide(dataclasses.replace(record, state=RelayState.COMMITTING))
        else:
            reason = "confirmation tag differs: the two ends hold different keys"
            self._decide(
                dataclasses.replace(record, state=RelayState.ABORTING, key=b"", reason=reason)
            )

    def _abort_requested(self, key_id: uuid.UUID) -> None:
        record = self._store.relay(key_id)
        if (
            record is None
            or record.position is not Position.ORIGIN
            or record.state is not RelayState.PENDING
        ):
            return  # unknown, or decided already: the decision stands
        reason = "abandoned by the origin"
        self._decide(dataclasses.replace(record, state=RelayState.ABORTING, key=b"", reason=reason))

    def _decide(self, record: RelayRecord) -> None:
        self._save(record)
        self._send_decision(record)

    # ---- middle and terminal: the first Forward ------------------------------------------------
    def _incoming_span(self, message: Forward) -> PadRange:
        upstream = _neighbour(message.route, self.node, -1)
        span = PadRange(
            peer=upstream,
            direction=Direction.IN,
            offset_bits=message.pad_offset_bits,
            bits=message.payload_bits,
        )
        if self._pads.spent_overlaps(span):
            raise ProtocolError(
                f"pad bits from {upstream} already used, refused or allocated",
                field="pad_offset_bits",
            )
        return span

    def _middle_forward(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is None and isinstance(message, Forward)
        span_in = self._incoming_span(message)
        following = _neighbour(message.route, self.node, +1)
        span_out, refusal = self._outgoing_span(following, span_in.bits)
        refusal = self._incoming_refusal(span_in) or refusal
        if refusal:
            self._refuse_forward(message, Position.MIDDLE, span_in, refusal)
            return
        assert span_out is not None
        payload = one_time_pad(message.ciphertext, self._pads.pad(span_in))
        forward = dataclasses.replace(
            message,
            pad_offset_bits=span_out.offset_bits,
            ciphertext=one_time_pad(payload, self._pads.pad(span_out)),
        )
        stored = _first_record(message, Position.MIDDLE, RelayState.PENDING, span_in)
        stored = dataclasses.replace(stored, pad_out=span_out, forward_out=forward)
        self._save(stored, PadSpend(range=span_in, used=True), PadSpend(range=span_out, used=True))
        self._send(following, forward)

    def _terminal_forward(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is None and isinstance(message, Forward)
        span_in = self._incoming_span(message)
        refusal = self._incoming_refusal(span_in)
        if not refusal and message.slave_sae_id not in self.config.local_sae_ids:
            refusal = "the slave SAE is not served here"
        if refusal:
            self._refuse_forward(message, Position.TERMINAL, span_in, refusal)
            return
        payload = one_time_pad(message.ciphertext, self._pads.pad(span_in))
        key, confirmation_key = payload[: message.key_bits // 8], payload[message.key_bits // 8 :]
        tag = confirmation_tag(message.key_id, message.route, key, confirmation_key)
        stored = _first_record(message, Position.TERMINAL, RelayState.PREPARED, span_in)
        stored = dataclasses.replace(stored, key=key, tag=tag)
        self._save(stored, PadSpend(range=span_in, used=True))
        self._send_prepared(stored)

    def _outgoing_span(self, peer: str, bits: int) -> tuple[PadRange | None, str]:
        """The next ``bits`` of the outgoing stream to ``peer``, or why there are none."""
        if peer not in self.config.neighbours:
            return None, f"no link to {peer}"
        cursor = self._pads.next_offset_bits(peer)
        span = PadRange(peer=peer, direction=Direction.OUT, offset_bits=cursor, bits=bits)
        if span.end_bits > self._pads.available_bits(peer, Direction.OUT):
            return None, f"the pad stream to {peer} holds too few bits"
        return span, ""

    def _incoming_refusal(self, span: PadRange) -> str:
        if span.end_bits > self._pads.available_bits(span.peer, Direction.IN):
            return f"the pad bits from {span.peer} are not here yet"
        return ""

    def _refuse_forward(
        self, message: Forward, position: Position, span_in: PadRange, reason: str
    ) -> None:
        stored = _first_record(message, position, RelayState.ABORTED, span_in)
        stored = dataclasses.replace(stored, reason=reason)
        self._save(stored, PadSpend(range=span_in, used=False))
        self._send_outcome(stored)
        self._finished(stored)

    # ---- middle and terminal: later messages ---------------------------------------------------
    def _duplicate_forward(self, record: RelayRecord | None, message: RelayMessage) -> None:
        """A Forward for a relay stored here: answer with what the state owes."""
        assert record is not None and isinstance(message, Forward)
        if record.pad_in is None:
            # an abort arrived first (tombstone): count the range as spent now
            assert record.state is RelayState.ABORTED
            span_in = self._incoming_span(message)
            stored = _first_record(message, record.position, RelayState.ABORTED, span_in)
            stored = dataclasses.replace(stored, reason=record.reason)
            self._save(stored, PadSpend(range=span_in, used=False))
            self._send_outcome(stored)
            return
        _check_same_forward(record, message)
        if record.state.finished:
            self._send_outcome(record)
        elif record.state is RelayState.PENDING:
            assert record.forward_out is not None
            self._send(_neighbour(record.route, self.node, +1), record.forward_out)
        elif record.state is RelayState.PREPARED:
            self._send_prepared(record)
        # committing / aborting: the decision travels on; nothing to answer

    def _pass_prepared(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is not None and isinstance(message, Prepared)
        self._send(_neighbour(record.route, self.node, -1), message)

    def _repeat_decision(self, record: RelayRecord | None, message: RelayMessage) -> None:
        """A Prepared or Decide after this node stored its decision: send the decision again
        (a Decide that contradicts it is refused)."""
        assert record is not None
        if isinstance(message, Decide):
            _check_agrees(record, message.commit, "commit")
        self._send_decision(record)

    def _middle_decide(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is not None and isinstance(message, Decide)
        state = RelayState.COMMITTING if message.commit else RelayState.ABORTING
        reason = "" if message.commit else "aborted by the origin"
        self._decide(dataclasses.replace(record, state=state, reason=reason))

    def _terminal_decide(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is not None and isinstance(message, Decide)
        if message.commit:
            stored = dataclasses.replace(record, state=RelayState.COMMITTED)
        else:
            stored = dataclasses.replace(
                record, state=RelayState.ABORTED, key=b"", reason="aborted by the origin"
            )
        self._save(stored)
        self._send_outcome(stored)
        self._finished(stored)

    def _decide_unknown(self, record: RelayRecord | None, message: RelayMessage) -> None:
        """A Decide for a relay whose Forward never arrived here: only an abort is possible."""
        assert record is None and isinstance(message, Decide)
        if message.commit:
            raise ProtocolError("a commit of a relay this node never prepared", field="commit")
        index = message.route.index(self.node)
        stored = RelayRecord(
            key_id=message.key_id,
            route=message.route,
            position=_position(index, len(message.route)),
            master_sae_id="",
            slave_sae_id="",
            key_bits=0,
            state=RelayState.ABORTED,
            reason="aborted by the origin before the key arrived",
        )
        self._save(stored)
        self._send_outcome(stored)
        self._finished(stored)

    def _answer_outcome(self, record: RelayRecord | None, message: RelayMessage) -> None:
        """A Decide for a finished relay: its outcome again."""
        assert record is not None and isinstance(message, Decide)
        _check_agrees(record, message.commit, "commit")
        self._send_outcome(record)

    # ---- outcomes (origin and middle) ----------------------------------------------------------
    def _outcome_pending(self, record: RelayRecord | None, message: RelayMessage) -> None:
        """Refused downstream before any decision."""
        assert record is not None and isinstance(message, Outcome)
        if message.committed:
            raise ProtocolError("a committed outcome before any decision", field="committed")
        self._finish(record, committed=False, reason=message.reason)

    def _outcome_decided(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is not None and isinstance(message, Outcome)
        _check_agrees(record, message.committed, "committed")
        self._finish(record, committed=message.committed, reason=record.reason or message.reason)

    def _stale_outcome(self, record: RelayRecord | None, message: RelayMessage) -> None:
        assert record is not None and isinstance(message, Outcome)
        _check_agrees(record, message.committed, "committed")

    def _ignore(self, record: RelayRecord | None, message: RelayMessage) -> None:
        """A stale duplicate that the stored state already answers."""
        if isinstance(message, Forward):
            assert record is not None
            _check_same_forward(record, message)

    def _finish(self, record: RelayRecord, *, committed: bool, reason: str) -> None:
        state = RelayState.COMMITTED if committed else RelayState.ABORTED
        stored = dataclasses.replace(
            record,
            state=state,
            key=record.key if committed else b"",
            reason="" if committed else reason,
        )
        self._save(stored)
        if stored.position is Position.MIDDLE:
            self._send_outcome(stored)
        self._finished(stored)

    # ---- retransmission ------------------------------------------------------------------------
    def _retransmit(self) -> None:
        for record in self._store.unfinished_relays():
            if record.state is RelayState.PENDING:
                assert record.forward_out is not None
                self._send(_neighbour(record.route, self.node, +1), record.forward_out)
            elif record.state is RelayState.PREPARED:
                self._send_prepared(record)
            else:
                self._send_decision(record)

    # ---- output helpers ------------------------------------------------------------------------
    def _save(self, record: RelayRecord, *spends: PadSpend) -> None:
        self._out.append(SaveRelay(record=record, spends=spends))

    def _send(self, peer: str, message: RelayMessage) -> None:
        self._out.append(SendRelay(peer=peer, message=message))

    def _send_decision(self, record: RelayRecord) -> None:
        commit = record.state is RelayState.COMMITTING
        assert commit or record.state is RelayState.ABORTING
        following = _neighbour(record.route, self.node, +1)
        self._send(following, Decide(key_id=record.key_id, route=record.route, commit=commit))

    def _send_prepared(self, record: RelayRecord) -> None:
        upstream = _neighbour(record.route, self.node, -1)
        self._send(upstream, Prepared(key_id=record.key_id, route=record.route, tag=record.tag))

    def _send_outcome(self, record: RelayRecord) -> None:
        committed = record.state is RelayState.COMMITTED
        assert committed or record.state is RelayState.ABORTED
        outcome = Outcome(
            key_id=record.key_id,
            route=record.route,
            committed=committed,
            reason="" if committed else record.reason,
        )
        self._send(_neighbour(record.route, self.node, -1), outcome)

    def _finished(self, record: RelayRecord) -> None:
        self._out.append(
            RelayFinished(
                key_id=record.key_id,
                position=record.position,
                committed=record.state is RelayState.COMMITTED,
                reason=record.reason,
            )
        )


# ---- helpers -----------------------------------------------------------------------------------


def _position(index: int, length: int) -> Position:
    if index == 0:
        return Position.ORIGIN
    return Position.TERMINAL if index == length - 1 else Position.MIDDLE


def _neighbour(route: tuple[str, ...], node: str, step: int) -> str:
    return route[route.index(node) + step]


def _first_record(
    message: Forward, position: Position, state: RelayState, span_in: PadRange
) -> RelayRecord:
    return RelayRecord(
        key_id=message.key_id,
        route=message.route,
        position=position,
        master_sae_id=message.master_sae_id,
        slave_sae_id=message.slave_sae_id,
        key_bits=message.key_bits,
        state=state,
        pad_in=span_in,
        in_digest=ciphertext_digest(message.ciphertext),
    )


def _check_same_forward(record: RelayRecord, message: Forward) -> None:
    span = record.pad_in
    same = (
        span is not None
        and record.master_sae_id == message.master_sae_id
        and record.slave_sae_id == message.slave_sae_id
        and record.key_bits == message.key_bits
        and span.offset_bits == message.pad_offset_bits
        and hmac.compare_digest(record.in_digest, ciphertext_digest(message.ciphertext))
    )
    if not same:
        raise ProtocolError("key ID known here with other contents", field="key_id")


def _check_agrees(record: RelayRecord, commit: bool, field: str) -> None:
    stored = record.state in (RelayState.COMMITTING, RelayState.COMMITTED)
    if commit != stored:
        decision = "commit" if stored else "abort"
        raise ProtocolError(f"contradicts the stored decision to {decision}", field=field)


# ---- the transition table ----------------------------------------------------------------------

ORG, MID, TRM = Position.ORIGIN, Position.MIDDLE, Position.TERMINAL
S = RelayState
R = RelayMachine

#: (position, stored state or None for no record, message type) -> handler. A message that
#: travels downstream (Forward, Decide) never reaches an origin, nor one that travels upstream
#: (Prepared, Outcome) a terminal: the neighbour check refuses those before the table.
_TRANSITIONS: Final[dict[tuple[Position, RelayState | None, type], Handler]] = {
    # origin
    (ORG, S.PENDING, Prepared): R._origin_prepared,
    (ORG, S.PENDING, Outcome): R._outcome_pending,
    (ORG, S.COMMITTING, Prepared): R._repeat_decision,
    (ORG, S.ABORTING, Prepared): R._repeat_decision,
    (ORG, S.COMMITTING, Outcome): R._outcome_decided,
    (ORG, S.ABORTING, Outcome): R._outcome_decided,
    (ORG, S.COMMITTED, Prepared): R._ignore,
    (ORG, S.ABORTED, Prepared): R._ignore,
    (ORG, S.COMMITTED, Outcome): R._stale_outcome,
    (ORG, S.ABORTED, Outcome): R._stale_outcome,
    # middle
    (MID, None, Forward): R._middle_forward,
    (MID, None, Decide): R._decide_unknown,
    (MID, S.PENDING, Forward): R._duplicate_forward,
    (MID, S.PENDING, Prepared): R._pass_prepared,
    (MID, S.PENDING, Decide): R._middle_decide,
    (MID, S.PENDING, Outcome): R._outcome_pending,
    (MID, S.COMMITTING, Forward): R._ignore,
    (MID, S.ABORTING, Forward): R._ignore,
    (MID, S.COMMITTING, Prepared): R._repeat_decision,
    (MID, S.ABORTING, Prepared): R._repeat_decision,
    (MID, S.COMMITTING, Decide): R._repeat_decision,
    (MID, S.ABORTING, Decide): R._repeat_decision,
    (MID, S.COMMITTING, Outcome): R._outcome_decided,
    (MID, S.ABORTING, Outcome): R._outcome_decided,
    (MID, S.COMMITTED, Forward): R._duplicate_forward,
    (MID, S.ABORTED, Forward): R._duplicate_forward,
    (MID, S.COMMITTED, Decide): R._answer_outcome,
    (MID, S.ABORTED, Decide): R._answer_outcome,
    (MID, S.COMMITTED, Prepared): R._ignore,
    (MID, S.ABORTED, Prepared): R._ignore,
    (MID, S.COMMITTED, Outcome): R._stale_outcome,
    (MID, S.ABORTED, Outcome): R._stale_outcome,
    # terminal
    (TRM, None, Forward): R._terminal_forward,
    (TRM, None, Decide): R._decide_unknown,
    (TRM, S.PREPARED, Forward): R._duplicate_forward,
    (TRM, S.PREPARED, Decide): R._terminal_decide,
    (TRM, S.COMMITTED, Forward): R._duplicate_forward,
    (TRM, S.ABORTED, Forward): R._duplicate_forward,
    (TRM, S.COMMITTED, Decide): R._answer_outcome,
    (TRM, S.ABORTED, Decide): R._answer_outcome,
}
