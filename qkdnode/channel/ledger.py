"""The authentication-key ledger: every authentication-key bit is deposited and drawn here.

The pool is a stream of one-time key bytes: deposits append to its end, draws consume from its
front, and a bit once drawn is gone (``consumed_bits`` only grows). Both peers hold a ledger; as
long as they deposit the same key bytes in the same order and draw the same sizes in the same
order, they hold the same bits at the same offset. The connection checks this every block by
exchanging ``fingerprint()`` (a hash of the public counters, never of key bytes) and every
key-derived handshake by comparing ``deposit_digest`` (a hash chain over deposit sizes and
marks, never over key bytes). Bits that differ in content show up as failed tags.

Deposit sizes must be the same on both sides although the two peers commit keys at different
times. So the pool's need is computed against ``mark_consumed_bits``, the offset recorded at the
block's open (``BlockAuthenticated.ledger_mark_bits``), which both peers reach in the same stream
order, not against the level at the moment of the call.

Handshake keys come from a stream of their own, disjoint from every pool bit (frame-MAC keys,
Wegman–Carter hash keys and pads, rotation keys): each deposit appends up to
``HANDSHAKE_SLOTS_PER_DEPOSIT`` slots of 32 bytes taken from the block key after the pool's
share, numbered from 0 for the ledger's whole life. Each slot seeds
``HANDSHAKE_KEYS_PER_SLOT`` handshake keys, HMAC-SHA256 of the slot over the key's number (a PRF
under a uniform key: Bellare, "New proofs for NMAC and HMAC", CRYPTO 2006), so an attacker who
makes every handshake attempt fail never runs the stream dry. Handshake keys are numbered
``slot * HANDSHAKE_KEYS_PER_SLOT + n``; each is used for one attempt only
(``take_handshake_key``) and burned with every lower number before it is returned;
``peek_handshake_key`` computes one without using it (Alice checks Bob's proof with it first);
at most ``HANDSHAKE_SLOTS_HELD`` slots are kept (older ones are erased).

The state (``LedgerState``) is what the key store persists; its ``repr`` hides the pool.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Final

import msgpack

from qkdnode.errors import AuthKeyExhausted, KeyStoreError, ProtocolError

_DIGEST_INIT = hashlib.sha256(b"qkdnode-v1 auth-key deposits").digest()

HANDSHAKE_SLOT_BYTES: Final = 32  # one handshake key (HANDSHAKE_KEY_BITS)
HANDSHAKE_SLOTS_PER_DEPOSIT: Final = 8
HANDSHAKE_SLOTS_HELD: Final = 64  # older unused slots are erased beyond this
HANDSHAKE_KEYS_PER_SLOT: Final = 1 << 16
_HANDSHAKE_KEY_LABEL: Final = b"qkdnode-v1 handshake key "
# deposits the peer may hold that this side does not yet (blocks committed there, staged here)
HANDSHAKE_SLOTS_LAG: Final = 4 * HANDSHAKE_SLOTS_PER_DEPOSIT


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerState:
    """A persistable snapshot of one ledger. ``pool`` is secret and never shown."""

    pool: bytes = b""
    consumed_bits: int = 0
    deposited_bits: int = 0
    target_bits: int
    reserve_bits: int
    tags_issued: int = 0
    forgery_bound: float = 0.0
    # the summed epsilon of every block whose bits entered the pool (its tag keys are only that
    # close to uniform); a ledger of the key-derived chain counts them since its bootstrap
    tag_key_epsilon: float = 0.0
    deposit_digest: bytes = _DIGEST_INIT
    active: bool = False
    # the handshake-key stream: slots [handshake_first, handshake_deposited), 32 bytes each
    handshake_pool: bytes = b""
    handshake_first: int = 0
    handshake_deposited: int = 0
    # the keys of slot ``handshake_first`` below this number are used
    handshake_next_key: int = 0

    def __repr__(self) -> str:
        return (
            f"LedgerState(level_bits={len(self.pool) * 8}, consumed_bits={self.consumed_bits}, "
            f"deposited_bits={self.deposited_bits}, target_bits={self.target_bits}, "
            f"reserve_bits={self.reserve_bits}, tags_issued={self.tags_issued}, "
            f"forgery_bound={self.forgery_bound:.3e}, tag_key_epsilon={self.tag_key_epsilon:.3e}, "
            f"active={self.active}, "
            f"handshake_slots={self.handshake_first}..{self.handshake_deposited}, "
            f"next_key={self.handshake_next_key})"
        )


def _handshake_key(slot: bytes, number: int) -> bytes:
    return hmac.digest(slot, _HANDSHAKE_KEY_LABEL + number.to_bytes(4, "big"), "sha256")


def _first_unused(state: LedgerState) -> int:
    return state.handshake_first * HANDSHAKE_KEYS_PER_SLOT + state.handshake_next_key


def _held_from(state: LedgerState) -> int:
    """The index of the first slot in ``handshake_pool`` (the pool is empty when every slot
    deposited so far is used)."""
    return min(state.handshake_first, state.handshake_deposited)


def ledger_state_to_bytes(state: LedgerState) -> bytes:
    """Serialise a ledger state for the key store (it holds pool key: store only)."""
    packed: bytes = msgpack.packb(
        {f.name: getattr(state, f.name) for f in fields(state)}, use_bin_type=True
    )
    return packed


def ledger_state_from_bytes(data: bytes) -> LedgerState:
    """The ledger state the key store holds; ``KeyStoreError`` if it is corrupt."""
    values = msgpack.unpackb(data, raw=False)
    if not isinstance(values, dict):
        raise KeyStoreError("authentication ledger state is corrupt")
    try:
        return LedgerState(**values)
    except TypeError as exc:
        raise KeyStoreError(f"authentication ledger state is corrupt ({exc})") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class DrawRecord:
    """One draw, for audit logs and tests: where and how much, never the bits."""

    offset_bits: int
    nbits: int
    purpose: str


class AuthKeyLedger:
    """The authentication-key pool of one node, with explicit, persistable state.

    - ``deposit(key, mark_consumed_bits=...)`` takes what the pool needs to return to
      ``target_bits`` and returns the number of bytes taken from the front of ``key``;
    - ``draw(nbits, purpose)`` consumes fresh bits, raising ``AuthKeyExhausted`` if the level
      would fall below ``reserve_bits`` (``allow_reserve=True`` may dig into the reserve but
      never below zero);
    - ``take_handshake_key(index)`` uses one key of the separate handshake-key stream.
    Sizes are whole bytes (multiples of 8 bits).
    """

    __slots__ = ("_state", "observer")

    def __init__(
        self,
        *,
        target_bits: int,
        reserve_bits: int,
        state: LedgerState | None = None,
        observer: Callable[[DrawRecord], None] | None = None,
    ) -> None:
        if state is None:
            state = LedgerState(target_bits=target_bits, reserve_bits=reserve_bits)
        else:
            state = replace(state, target_bits=target_bits, reserve_bits=reserve_bits)
        for name, value in (("target_bits", target_bits), ("reserve_bits", reserve_bits)):
            if value < 0 or value % 8:
                raise ValueError(f"{name} must be a non-negative multiple of 8")
        if reserve_bits > target_bits:
            raise ValueError("reserve_bits must not exceed target_bits")
        if max(0, state.deposited_bits - state.consumed_bits) != len(state.pool) * 8:
            raise ValueError("ledger state is inconsistent: level != deposited - consumed")
        self._state = state
        self.observer = observer

    def __repr__(self) -> str:
        return f"AuthKeyLedger({self._state!r})"

    # ---- read-only views -----------------------------------------------------------------
    @property
    def state(self) -> LedgerState:
        return self._state

    @property
    def level_bits(self) -> int:
        return len(self._state.pool) * 8

    @property
    def consumed_bits(self) -> int:
        return self._state.consumed_bits

    @property
    def tags_issued(self) -> int:
        return self._state.tags_issued

    @property
    def forgery_bound(self) -> float:
        return self._state.forgery_bound

    @property
    def tag_key_epsilon(self) -> float:
        """The summed epsilon of the blocks whose bits entered the pool (see ``deposit``)."""
        return self._state.tag_key_epsilon

    @property
    def active(self) -> bool:
        """True once the link has rotated to key-derived authentication."""
        return self._state.active

    def can_pay(self, nbits: int, *, allow_reserve: bool = False) -> bool:
        floor = 0 if allow_reserve else self._state.reserve_bits
        return self.level_bits - nbits >= floor

    def fingerprint(self) -> bytes:
        """SHA-256 of the public counters (offset, tag count, forgery bound); no key bits."""
        s = self._state
        return hashlib.sha256(
            b"qkdnode-v1 ledger"
            + struct.pack(">QQd", s.consumed_bits, s.tags_issued, s.forgery_bound)
        ).digest()

    # ---- mutations ------------------------------------------------------------------------
    def deposit(self, key: bytes, *, mark_consumed_bits: int, key_epsilon: float = 0.0) -> int:
        """Append to the pool what it needs from ``key``, then up to
        ``HANDSHAKE_SLOTS_PER_DEPOSIT`` handshake-key slots from what follows; return the number
        of bytes taken from the front of ``key`` (pool share first, then the slots).

        ``key_epsilon`` is the key's distance from uniform (its block's eps_sec + eps_cor); it is
        added to ``tag_key_epsilon`` when any of the key is taken.

        The pool's need is ``target - (deposited - mark_consumed_bits)``, rounded up to bytes,
        so both peers take the same amount whenever they deposit the same keys with the same
        marks; the slots depend on the key's length only.
        """
        s = self._state
        if mark_consumed_bits < 0 or mark_consumed_bits > s.consumed_bits:
            raise ProtocolError("must be between 0 and the consumed offset", field="mark")
        need_bits = s.target_bits - (s.deposited_bits - mark_consumed_bits)
        # the slots' share (one slot, and more up to 1/16 of the key) is kept from a pool
        # still filling up, so every committed block of two slots or more refills the
        # handshake-key stream
        kept = (
            HANDSHAKE_SLOT_BYTES
            * min(HANDSHAKE_SLOTS_PER_DEPOSIT, max(1, len(key) // (16 * HANDSHAKE_SLOT_BYTES)))
            if len(key) >= 2 * HANDSHAKE_SLOT_BYTES
            else 0
        )
        taken = min(len(key) - kept, max(0, -(-need_bits // 8)))
        slots = min(HANDSHAKE_SLOTS_PER_DEPOSIT, (len(key) - taken) // HANDSHAKE_SLOT_BYTES)
        handshake = key[taken : taken + slots * HANDSHAKE_SLOT_BYTES]
        digest = hashlib.sha256(
            s.deposit_digest + struct.pack(">QQQ", taken, mark_consumed_bits, slots)
        ).digest()
        deposited = s.handshake_deposited + slots
        first = max(s.handshake_first, deposited - HANDSHAKE_SLOTS_HELD)
        next_key = s.handshake_next_key if first == s.handshake_first else 0
        held = (s.handshake_pool + handshake)[(first - _held_from(s)) * HANDSHAKE_SLOT_BYTES :]
        # stream positions below the consumed offset (a handshake advanced past what was
        # deposited here) are burned as they arrive
        burned = min(taken, max(0, s.consumed_bits - s.deposited_bits) // 8)
        self._state = replace(
            s,
            pool=s.pool + key[burned:taken],
            deposited_bits=s.deposited_bits + taken * 8,
            deposit_digest=digest,
            handshake_pool=held,
            handshake_first=first,
            handshake_deposited=deposited,
            handshake_next_key=next_key,
            tag_key_epsilon=s.tag_key_epsilon + (key_epsilon if taken or slots else 0.0),
        )
        return taken + len(handshake)

    @property
    def holds_handshake_key(self) -> bool:
        """True while a deposited slot has an unused handshake key."""
        return self._state.handshake_first < self._state.handshake_deposited

    @property
    def handshake_first(self) -> int:
        """The number of the lowest unused handshake key (every lower one is gone)."""
        return _first_unused(self._state)

    def _used_through(self, number: int) -> LedgerState:
        """The state with handshake key ``number`` and every lower one used."""
        s = self._state
        slot, key = divmod(max(_first_unused(s), number + 1), HANDSHAKE_KEYS_PER_SLOT)
        drop = min(slot, s.handshake_deposited) - _held_from(s)
        return replace(
            s,
            handshake_pool=s.handshake_pool[drop * HANDSHAKE_SLOT_BYTES :],
            handshake_first=slot,
            handshake_next_key=key,
        )

    def _report_handshake(self, number: int) -> None:
        if self.observer is not None:
            self.observer(
                DrawRecord(
                    offset_bits=number * HANDSHAKE_SLOT_BYTES * 8,
                    nbits=HANDSHAKE_SLOT_BYTES * 8,
                    purpose="handshake",
                )
            )

    def burn_handshake_through(self, index: int) -> None:
        """Mark handshake key ``index`` and every lower one used, its slot held here or not yet
        deposited (Bob answered from a block he has staged and will commit); persisted by the
        observer."""
        self._state = self._used_through(index)
        self._report_handshake(index)

    def responder_handshake_index(self) -> int | None:
        """The handshake key Bob uses for the next attempt, or None if he holds no slot.

        The lowest unused key, but never in a slot the initiator may already have erased: she
        may hold up to ``HANDSHAKE_SLOTS_LAG`` more recent slots (blocks committed on her side,
        still staged here) and erases beyond ``HANDSHAKE_SLOTS_HELD``. The choice depends on
        this ledger only, so an unauthenticated Hello moves the stream by one key.
        """
        s = self._state
        oldest = s.handshake_deposited - HANDSHAKE_SLOTS_HELD + HANDSHAKE_SLOTS_LAG
        index = max(_first_unused(s), oldest * HANDSHAKE_KEYS_PER_SLOT)
        return index if index // HANDSHAKE_KEYS_PER_SLOT < s.handshake_deposited else None

    def peek_handshake_key(self, index: int) -> bytes:
        """Handshake key ``index`` without using it, to verify a proof that names it; the state
        is untouched. ``ProtocolError`` if the key is burned or its slot was never deposited
        here."""
        s = self._state
        slot, number = divmod(index, HANDSHAKE_KEYS_PER_SLOT)
        if not _first_unused(s) <= index or not slot < s.handshake_deposited:
            raise ProtocolError(
                f"handshake key {index} is not held here (unused keys from "
                f"{_first_unused(s)}, slots below {s.handshake_deposited})",
                field="handshake_index",
            )
        start = (slot - _held_from(s)) * HANDSHAKE_SLOT_BYTES
        return _handshake_key(s.handshake_pool[start : start + HANDSHAKE_SLOT_BYTES], number)

    def take_handshake_key(self, index: int) -> bytes:
        """Handshake key ``index``, used once: it and every lower key are burned (persisted by
        the observer before the key is returned). ``ProtocolError`` if the key is burned or its
        slot was never deposited here."""
        key = self.peek_handshake_key(index)
        self._state = self._used_through(index)
        self._report_handshake(index)
        return key

    def draw(self, nbits: int, purpose: str, *, allow_reserve: bool = False) -> bytes:
        """Consume ``nbits`` fresh bits; ``AuthKeyExhausted`` (state untouched) if unaffordable."""
        return self.draw_many((nbits,), purpose, allow_reserve=allow_reserve)[0]

    def draw_many(
        self, sizes_bits: Sequence[int], purpose: str, *, allow_reserve: bool = False
    ) -> list[bytes]:
        """Consume consecutive keys of ``sizes_bits`` bits in one step, reported to the observer
        as one draw (one write-ahead for all of them); ``AuthKeyExhausted`` (state untouched)
        if their total is unaffordable."""
        for nbits in sizes_bits:
            self._check_size(nbits)
        total_bits = sum(sizes_bits)
        if not self.can_pay(total_bits, allow_reserve=allow_reserve):
            raise AuthKeyExhausted(
                f"{purpose}: needs {total_bits} bits, level {self.level_bits}, "
                f"reserve {self._state.reserve_bits}"
            )
        s = self._state
        keys, start = [], 0
        for nbits in sizes_bits:
            keys.append(s.pool[start : start + nbits // 8])
            start += nbits // 8
        self._state = replace(s, pool=s.pool[start:], consumed_bits=s.consumed_bits + total_bits)
        if self.observer is not None:
            self.observer(
                DrawRecord(offset_bits=s.consumed_bits, nbits=total_bits, purpose=purpose)
            )
        return keys

    def advance_to(self, offset_bits: int, *, tags_issued: int, forgery_bound: float) -> None:
        """Burn everything before ``offset_bits`` and raise the counters to at least the given.

        Used once a key-derived handshake has authenticated both sides' public ledger state.
        The offset may lie past what was deposited here (the peer committed a block this side
        has only staged): the pool is then empty, and the missing positions are burned when
        their deposit arrives, in limbo resolution, so both sides hold the same bits again.
        """
        s = self._state
        skip_bits = offset_bits - s.consumed_bits
        if skip_bits < 0 or skip_bits % 8:
            raise ProtocolError("cannot advance the ledger there", field="offset_bits")
        self._state = replace(
            s,
            pool=s.pool[skip_bits // 8 :],
            consumed_bits=offset_bits,
            tags_issued=max(s.tags_issued, tags_issued),
            forgery_bound=max(s.forgery_bound, forgery_bound),
        )
        # persisted now: a crash before the next draw must not bring the old offset back, or
        # the peer's offset runs ahead of this one a session's draws at a time
        if skip_bits and self.observer is not None:
            self.observer(DrawRecord(offset_bits=s.consumed_bits, nbits=skip_bits, purpose="sync"))

    def record_tags(self, count: int, forgery_bound_each: float) -> None:
        """Account ``count`` one-time tags, each with forgery probability at most the given."""
        s = self._state
        self._state = replace(
            s,
            tags_issued=s.tags_issued + count,
            forgery_bound=s.forgery_bound + count * forgery_bound_each,
        )

    def reset(self) -> None:
        """Forget the pool and every counter (both peers agreed to, over a bootstrap-
        authenticated session, after their ledgers diverged). Unused pool bits are discarded,
        never reused; the pool refills from the next committed keys."""
        s = self._state
        self._state = LedgerState(
            target_bits=s.target_bits,
            reserve_bits=s.reserve_bits,
            # the handshake-key stream starts again from slot 0 on both sides, so their numbers
            # agree even where the diverged ledgers had deposited different slot counts; every
            # key comes from new slots, so none repeats
        )
        if self.observer is not None:
            self.observer(DrawRecord(offset_bits=0, nbits=0, purpose="reset"))

    def close_bootstrap_window(self) -> None:
        """Mark the ledger active without telling the observer: the store persists it with the
        block commit whose deposit closed the window, in the same transaction."""
        self._state = replace(self._state, active=True)

    def set_active(self, active: bool) -> None:
        """Mark the bootstrap window closed (``True``); the observer persists it at once."""
        if active == self._state.active:
            return
        self._state = replace(self._state, active=active)
        if self.observer is not None:
            self.observer(
                DrawRecord(offset_bits=self._state.consumed_bits, nbits=0, purpose="activate")
            )

    @staticmethod
    def _check_size(nbits: int) -> None:
        if nbits <= 0 or nbits % 8:
            raise ValueError("draw sizes are positive multiples of 8 bits")
