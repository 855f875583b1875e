"""One open block's authentication: its frame MACs, both transcripts, and the close record.

In key-derived mode a block draws six fresh keys from the pool (``BLOCK_DRAWS``: per direction a
frame MAC key, a polynomial-hash key and a one-time pad for the Wegman-Carter transcript tag); in
a bootstrap session it uses the session's control keys and HMAC transcripts. Each side's
BlockClose tags its transcript ended by the close record (block id, frame count, ledger
fingerprint), so both sides agree on every frame of the block before its keys are committed.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from qkdnode.channel.auth import (
    BLOCK_DRAW_BITS,
    BLOCK_DRAWS,
    BlockTranscript,
    FrameMac,
    Role,
)
from qkdnode.channel.channel_events import BlockAuthenticated
from qkdnode.channel.handshake import ZERO_DIGEST
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import BlockClose, SessionMode
from qkdnode.channel.polyhash import BLOCK_BYTES
from qkdnode.errors import AuthenticationFailed, ProtocolError


@dataclass(slots=True, kw_only=True)
class OpenBlock:
    """A block between its BlockOpen and both BlockCloses (MACs and transcripts redact keys)."""

    block_id: int
    send_mac: FrameMac
    recv_mac: FrameMac
    send_transcript: BlockTranscript
    recv_transcript: BlockTranscript
    fingerprint: bytes
    mark_bits: int
    spent_bits: int
    frames_sent: int = 0
    frames_received: int = 0
    sent_close: bool = False
    received_close: bool = False

    def own_close(self) -> BlockClose:
        """This side's BlockClose: ends its transcript with the close record and tags it."""
        self.send_transcript.absorb(close_record(self.block_id, self.frames_sent, self.fingerprint))
        return BlockClose(
            block_id=self.block_id,
            frames=self.frames_sent,
            transcript_tag=self.send_transcript.tag(),
            ledger_fingerprint=self.fingerprint,
        )

    def verify_peer_close(self, message: BlockClose) -> None:
        """Raises unless the peer's BlockClose counts the frames received here, names the same
        ledger fingerprint and tags exactly the transcript received here; changes nothing."""
        if message.frames != self.frames_received:
            raise ProtocolError("frame count differs from frames received", field="frames")
        if not hmac.compare_digest(message.ledger_fingerprint, self.fingerprint):
            raise AuthenticationFailed("authentication-key ledgers differ between the peers")
        final = close_record(self.block_id, message.frames, message.ledger_fingerprint)
        expected = self.recv_transcript.peek_tag(final)
        if not hmac.compare_digest(expected, message.transcript_tag):
            raise AuthenticationFailed("block transcript tag does not verify")

    def authenticated(
        self, session_mode: SessionMode, forgery_bound_total: float
    ) -> BlockAuthenticated:
        """The event once both closes are verified; a block that drew pool keys is key-derived
        whatever the session's mode."""
        return BlockAuthenticated(
            block_id=self.block_id,
            mode=SessionMode.KEY_DERIVED if self.spent_bits else session_mode,
            ledger_mark_bits=self.mark_bits,
            auth_bits_spent=self.spent_bits,
            frames_sent=self.frames_sent,
            frames_received=self.frames_received,
            forgery_bound_total=forgery_bound_total,
        )


def key_derived_block(
    block_id: int,
    *,
    role: Role,
    session_id: bytes,
    ledger: AuthKeyLedger,
    tag_forgery_bound: float,
) -> OpenBlock:
    """A block keyed by six keys drawn now from the pool; records its two transcript tags."""
    keys = {name: ledger.draw(bits, f"block {name}") for name, bits in BLOCK_DRAWS}
    ledger.record_tags(2, tag_forgery_bound)
    mine, theirs = ("a2b", "b2a") if role is Role.ALICE else ("b2a", "a2b")
    return OpenBlock(
        block_id=block_id,
        send_mac=FrameMac(keys[f"mac_{mine}"], session_id, role),
        recv_mac=FrameMac(keys[f"mac_{theirs}"], session_id, role.peer),
        send_transcript=BlockTranscript(
            hash_key=keys[f"hash_{mine}"], pad=keys[f"pad_{mine}"], hmac_key=None
        ),
        recv_transcript=BlockTranscript(
            hash_key=keys[f"hash_{theirs}"], pad=keys[f"pad_{theirs}"], hmac_key=None
        ),
        fingerprint=ledger.fingerprint(),
        mark_bits=ledger.consumed_bits,
        spent_bits=BLOCK_DRAW_BITS,
    )


def session_keyed_block(
    block_id: int,
    *,
    send_mac: FrameMac,
    recv_mac: FrameMac,
    send_key: bytes,
    recv_key: bytes,
    ledger: AuthKeyLedger | None,
) -> OpenBlock:
    """A block of a bootstrap session: the session's control keys, no pool bit spent."""
    return OpenBlock(
        block_id=block_id,
        send_mac=send_mac,
        recv_mac=recv_mac,
        send_transcript=BlockTranscript(hmac_key=send_key),
        recv_transcript=BlockTranscript(hmac_key=recv_key),
        fingerprint=ledger.fingerprint() if ledger is not None else ZERO_DIGEST,
        mark_bits=ledger.consumed_bits if ledger is not None else 0,
        spent_bits=0,
    )


def close_record(block_id: int, frames: int, fingerprint: bytes) -> bytes:
    """The record both transcripts of a block end with."""
    return b"close" + struct.pack(">QQ", block_id, frames) + fingerprint


def check_transcript_room(
    transcript: BlockTranscript, record_bytes: int, *, max_block_chunks: int
) -> None:
    """A one-time (Wegman-Carter) transcript must stay within ``max_block_chunks``, which the
    forgery bound assumed; raises ``ProtocolError`` before the record would pass it."""
    if not transcript.one_time:
        return
    chunks = (record_bytes + 8 + BLOCK_BYTES - 1) // BLOCK_BYTES
    # keep room for the final record and the length chunk
    if transcript.chunks + chunks + 8 > max_block_chunks:
        raise ProtocolError("block transcript exceeds max_block_chunks", field="block")
