"""Key reservations with the peer node, for delivery (``Reserve`` / ``ReserveResult``).

The master side's node asks the peer to record durably that some delivery keys belong to a
(master SAE, slave SAE) pair before it hands them out. Requests and answers travel as
coordination messages over the current session; they are answered at once, concurrently (a
consumer must not wait for a block to finish), at most ``RESERVATIONS_IN_FLIGHT`` at a time, so
that the peer's concurrent ``enc_keys`` share store commits here (group commit).

A hybrid pair's reservation (format 2, ``qkdnode.delivery.keys``) carries the master's ML-KEM-768
encapsulation key; the answer carries the ciphertext and key confirmation. Both travel in control
frames, authenticated like every frame of the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack
import structlog
import trio

from qkdnode.coordination.wire import CoordinationMessage, Reserve, ReserveResult
from qkdnode.delivery.hybrid import HybridAnswer, HybridRequest
from qkdnode.delivery.keys import (
    KeyManager,
    hybrid_reservation_from_wire,
    hybrid_reservation_to_wire,
    reservation_format,
    reservation_from_wire,
    reservation_to_wire,
)
from qkdnode.errors import ProtocolError, QkdError
from qkdnode.store.keystore import DeliveryKey, ReservationRejected

log = structlog.get_logger("qkdnode.node")

RESERVATIONS_IN_FLIGHT: Final = 64  # peer reservations answered at once


class NoPeerSession(QkdError):
    """No session with the peer node is up (or it ended while a request waited)."""


SendMessage = Callable[[CoordinationMessage], Awaitable[None]]


@dataclass(slots=True)
class _Waiting:
    """A reservation request waiting for the peer's answer."""

    done: trio.Event
    error: Exception | None = None
    answer: HybridAnswer | None = None  # a hybrid reservation's ML-KEM answer


class Reservations:
    """Both directions of the reservation protocol for one node."""

    def __init__(self) -> None:
        self.manager: KeyManager | None = None
        self._send: SendMessage | None = None
        self._waiting: dict[int, _Waiting] = {}
        self._next_request_id = 0
        self._slots = trio.Semaphore(RESERVATIONS_IN_FLIGHT)

    # ---- the session in use ---------------------------------------------------------------
    def attach(self, send: SendMessage) -> None:
        """A session is up: requests go through ``send``."""
        self._send = send

    def detach(self, reason: str) -> None:
        """The session ended: waiting requests fail, new ones fail until the next session."""
        self._send = None
        for waiting in self._waiting.values():
            waiting.error = NoPeerSession(reason)
            waiting.done.set()

    # ---- our requests -----------------------------------------------------------------------
    async def peer_reserve(
        self, keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str
    ) -> None:
        """Have the peer node durably record that ``keys`` belong to (master, slave)."""
        await self._request(reservation_to_wire(keys, master_sae, slave_sae))

    async def peer_reserve_hybrid(
        self,
        keys: Sequence[DeliveryKey],
        master_sae: str,
        slave_sae: str,
        request: HybridRequest,
    ) -> HybridAnswer | None:
        """As :meth:`peer_reserve` for a hybrid pair: the peer's ML-KEM answer (None if it
        recorded the keys without one)."""
        wire = hybrid_reservation_to_wire(keys, master_sae, slave_sae, request)
        return (await self._request(wire)).answer

    async def _request(self, reservation: dict[str, object]) -> _Waiting:
        send = self._send
        if send is None:
            raise NoPeerSession("no session with the peer node")
        self._next_request_id += 1
        request_id = self._next_request_id
        waiting = _Waiting(trio.Event())
        self._waiting[request_id] = waiting
        try:
            wire = msgpack.packb(reservation, use_bin_type=True)
            await send(Reserve(request_id=request_id, reservation=wire))
            await waiting.done.wait()
        finally:
            self._waiting.pop(request_id, None)
        if waiting.error is not None:
            raise waiting.error
        return waiting

    def on_result(self, result: ReserveResult) -> None:
        waiting = self._waiting.get(result.request_id)
        if waiting is None:
            return  # the requester gave up (timeout); its keys were released
        if not result.ok:
            waiting.error = ReservationRejected(
                result.detail, burned_key_ids=list(result.burned_key_ids)
            )
        elif result.mlkem_ciphertext:
            try:
                waiting.answer = HybridAnswer(
                    mlkem_ciphertext=result.mlkem_ciphertext,
                    confirmation=result.mlkem_confirmation,
                )
            except ProtocolError as exc:
                waiting.error = exc
        waiting.done.set()

    # ---- the peer's requests ----------------------------------------------------------------
    async def answer_soon(self, request: Reserve, send: SendMessage, nursery: trio.Nursery) -> None:
        """Answer ``request`` in a task of ``nursery``; waits while RESERVATIONS_IN_FLIGHT run."""
        await self._slots.acquire()

        async def answer_and_release() -> None:
            try:
                await self.answer(request, send)
            finally:
                self._slots.release()

        nursery.start_soon(answer_and_release)

    async def answer(self, request: Reserve, send: SendMessage) -> None:
        """Record the peer's reservation durably and answer it."""
        burned: list[uuid.UUID] = []
        answer: HybridAnswer | None = None
        try:
            message = msgpack.unpackb(request.reservation, raw=False)
            if not isinstance(message, dict):
                raise ProtocolError("must be a map", field="reservation")
            if self.manager is None:
                raise ProtocolError("key delivery is not configured here", field="reservation")
            if reservation_format(message) == 2:
                keys, master_sae, slave_sae, hybrid = hybrid_reservation_from_wire(message)
                answer = await self.manager.record_peer_hybrid_reservation(
                    keys, master_sae, slave_sae, hybrid
                )
            else:
                keys, master_sae, slave_sae = reservation_from_wire(message)
                await self.manager.record_peer_reservation(keys, master_sae, slave_sae)
            ok, detail = True, ""
        except ReservationRejected as exc:
            ok, detail, burned = False, str(exc), list(exc.burned_key_ids)
        except (ProtocolError, ValueError) as exc:
            ok, detail = False, str(exc)
        if not ok:
            log.warning("delivery.reservation_refused", detail=detail)
        await send(
            ReserveResult(
                request_id=request.request_id,
                ok=ok,
                detail=detail[:512],
                burned_key_ids=tuple(burned),
                mlkem_ciphertext=b"" if answer is None else answer.mlkem_ciphertext,
                mlkem_confirmation=b"" if answer is None else answer.confirmation,
            )
        )
