"""One open block's authentication: its frame MACs, both transcripts, and the close record.

In key-derived mode a block draws six fresh keys from the pool (``BLOCK_DRAWS``: per direction a
frame MAC key, and Poly1305's r and s for the one-time Wegman–Carter transcript tag); in a
bootstrap session it uses the session's control keys and HMAC transcripts. Each side's
BlockClose tags its transcript ended by the close record (block id, frame count, ledger
fingerprint), so both sides agree on every frame of the block before its keys are committed.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import Final

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
from qkdnode.channel.wegman_carter import CHUNK_BYTES
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
        """This side's BlockClose: ends its transcript with the close record and tags it (the
        room for the close record was kept by ``check_transcript_room``)."""
        self.send_transcript.absorb(close_record(self.block_id, self.frames_sent, self.fingerprint))
        return BlockClose(
            block_id=self.block_id,
            frames=self.frames_sent,
            transcript_tag=self.send_transcript.tag(),
            ledger_fingerprint=self.fingerprint,
        )

    def verify_peer_close(self, message: BlockClose) -> None:
        """Raises unless the peer's BlockClose counts the frames received here, names the same
        ledger fingerprint and tags exactly the transcript received here. The tag is checked
        last and once: a one-time key is spent by its check whatever the outcome, and a
        failed check fails the connection, so no block state is used after it."""
        if message.frames != self.frames_received:
            raise ProtocolError("frame count differs from frames received", field="frames")
        if not hmac.compare_digest(message.ledger_fingerprint, self.fingerprint):
            raise AuthenticationFailed("authentication-key ledgers differ between the peers")
        final = close_record(self.block_id, message.frames, message.ledger_fingerprint)
        self.recv_transcript.verify_final(final, message.transcript_tag)

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
    """A block keyed by six keys drawn now from the pool in one draw (one write-ahead; sizes
    and order of ``BLOCK_DRAWS``);
    records its two one-time transcript tags, each with ``tag_forgery_bound``, in the ledger."""
    drawn = ledger.draw_many([bits for _, bits in BLOCK_DRAWS], "block keys")
    keys = {name: key for (name, _), key in zip(BLOCK_DRAWS, drawn, strict=True)}
    ledger.record_tags(2, tag_forgery_bound)
    mine, theirs = ("a2b", "b2a") if role is Role.ALICE else ("b2a", "a2b")
    return OpenBlock(
        block_id=block_id,
        send_mac=FrameMac(keys[f"mac_{mine}"], session_id, role),
        recv_mac=FrameMac(keys[f"mac_{theirs}"], session_id, role.peer),
        send_transcript=BlockTranscript(
            r=keys[f"hash_{mine}"], s=keys[f"pad_{mine}"], hmac_key=None
        ),
        recv_transcript=BlockTranscript(
            r=keys[f"hash_{theirs}"], s=keys[f"pad_{theirs}"], hmac_key=None
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
    """A one-time (Wegman–Carter) transcript must stay within ``max_block_chunks`` 16-byte
    chunks, the length its forgery bound assumes: raises ``ProtocolError`` before a record of
    ``record_bytes`` would leave no room for the close record."""
    if not transcript.one_time:
        return
    after = transcript.message_bytes + LENGTH_PREFIX_BYTES + record_bytes + CLOSE_ROOM_BYTES
    if after > max_block_chunks * CHUNK_BYTES:
        raise ProtocolError("block transcript exceeds max_block_chunks", field="block")


# each record is absorbed as u64 length || record; the close record ends every transcript
LENGTH_PREFIX_BYTES: Final = 8
CLOSE_ROOM_BYTES: Final = LENGTH_PREFIX_BYTES + len(close_record(0, 0, ZERO_DIGEST))
