"""The ETSI GS QKD 014 server: h11 over trio TLS streams with mutual TLS, and a Unix socket.

Thin I/O shell around :mod:`qkdnode.delivery.api` (parsing), :mod:`.fairuse` (quotas) and
:mod:`.keys` (the key manager). The caller's SAE ID is the CN of its client certificate, verified
against the SAE CA during the handshake (TLS 1.2 minimum, 1.3 preferred), with the SAE CA's CRLs
when ``sae_crl`` is set (OpenSSL checks every certificate of the chain; a stale CRL refuses); on
the Unix socket it is the SAE the socket is configured for, and the socket's file mode is the
access control.

After the handshake the client certificate must be an SAE certificate
(``qkdnode.channel.pki.require_purpose``): a node certificate, or one without the SAE purpose, gets
401 with the reason and the connection is closed. Refused certificates, at the TLS layer or
after it, are recorded in the audit trail (``sae_certificate_refused``, within a budget per client
address). The TLS context is read when a connection is accepted: replacing
``DeliveryServer.ssl_context`` (the daemon does on SIGHUP, with a reread CRL) applies to
connections accepted from then on; connections already open carry on under the old one.

Limits against misbehaving clients: at most ``max_connections`` at once (more are closed at
once), a TLS handshake deadline, one deadline per request covering headers and body (slowloris),
a header size and a body size limit. Every refusal is a JSON error and ends only that connection.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import ssl
import stat
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Protocol

import h11
import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from qkdnode.audit.trail import AuditValue
from qkdnode.channel.pki import Purpose, require_purpose
from qkdnode.channel.revocation import RevocationLists, parse_revocation_lists
from qkdnode.config.delivery import ApiLimits, DeliveryConfig, ServerLimits
from qkdnode.delivery.api import (
    MSG_UNAUTHORIZED,
    ApiError,
    DecKeysRequest,
    EncKeysRequest,
    Request,
    StatusRequest,
    authorize,
    error_body,
    key_container_body,
    parse_request,
    status_body,
)
from qkdnode.delivery.fairuse import FairUse, FairUsePolicy, QuotaExceeded
from qkdnode.delivery.keys import KeyManager
from qkdnode.errors import CertificateRejected, ConfigError, KeyStoreError

RECEIVE_BYTES: Final = 16384
_log = structlog.get_logger(__name__)


def server_ssl_context(
    certificate: Path,
    private_key: Path,
    sae_ca: Path,
    *,
    sae_crl: RevocationLists | None = None,
) -> ssl.SSLContext:
    """Server side of mutual TLS: TLS 1.2 minimum (1.3 preferred), client certificate required,
    and with ``sae_crl`` every certificate of the client's chain checked against its issuer's
    CRL (``VERIFY_CRL_CHECK_CHAIN``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(certificate, private_key)
    context.load_verify_locations(cafile=sae_ca)
    if sae_crl is not None:
        # OpenSSL reads CRLs from a file only: the CRLs checked when loaded, re-encoded, so
        # that it loads exactly those
        with tempfile.NamedTemporaryFile(suffix=".pem") as crl_file:
            crl_file.write(b"".join(crl.public_bytes(Encoding.PEM) for crl in sae_crl.crls))
            crl_file.flush()
            context.load_verify_locations(cafile=crl_file.name)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    context.set_alpn_protocols(["http/1.1"])
    return context


def read_sae_crl(config: DeliveryConfig, *, now_s: float) -> RevocationLists | None:
    """The CRLs of ``delivery.sae_crl`` checked against the SAE CA (None when not set);
    ``ConfigError`` naming the key if they do not load."""
    if config.sae_crl is None:
        return None
    try:
        data = config.sae_crl.read_bytes()
        ca_certificates = x509.load_pem_x509_certificates(config.sae_ca.read_bytes())
    except OSError as exc:
        raise ConfigError("delivery.sae_crl", f"readable files ({exc.strerror})") from None
    return parse_revocation_lists(
        data,
        ca_certificates=ca_certificates,
        now_s=now_s,
        source=str(config.sae_crl),
        key="delivery.sae_crl",
    )


def delivery_ssl_context(
    config: DeliveryConfig, *, now_s: float | None = None
) -> tuple[ssl.SSLContext, RevocationLists | None]:
    """The endpoint's TLS context from the config's files, and the SAE CRLs in it."""
    revocation = read_sae_crl(config, now_s=time.time() if now_s is None else now_s)
    context = server_ssl_context(
        config.certificate, config.private_key, config.sae_ca, sae_crl=revocation
    )
    return context, revocation


def certificate_sae_id(peer_certificate: object) -> str | None:
    """The single subject CN of a verified peer certificate (``getpeercert()`` form), or None."""
    if not isinstance(peer_certificate, dict):
        return None
    names = [
        value
        for rdn in peer_certificate.get("subject", ())
        for name, value in rdn
        if name == "commonName"
    ]
    return names[0] if len(names) == 1 and isinstance(names[0], str) and names[0] else None


# ---- the application: one request in, one response out ---------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class RelayedKeys(Protocol):
    """Keys shared with SAEs at other nodes, relayed through trusted nodes
    (``qkdnode.node.relaying.RelayService``)."""

    def serves(self, sae: str) -> bool: ...
    def route_to(self, sae: str) -> tuple[str, ...]: ...
    def stored_key_count(self, master_sae: str, slave_sae: str) -> int: ...
    async def enc_keys(
        self, *, master_sae: str, slave_sae: str, number: int, size_bits: int
    ) -> list[tuple[uuid.UUID, bytes]]: ...
    async def dec_keys(
        self, *, slave_sae: str, master_sae: str, key_ids: Sequence[uuid.UUID]
    ) -> list[tuple[uuid.UUID, bytes]]: ...


class DeliveryApp:
    """Authorizes, parses, applies fair use and calls the key manager; never raises ApiError."""

    def __init__(
        self,
        *,
        manager: KeyManager,
        limits: ApiLimits,
        kme_id: str,
        peer_kme_id: str,
        local_saes: tuple[str, ...],
        peer_saes: tuple[str, ...],
        fair_use: FairUse,
        max_key_count: int,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.manager = manager
        self.limits = limits
        self._kme_id, self._peer_kme_id = kme_id, peer_kme_id
        self._local_saes, self._peer_saes = frozenset(local_saes), frozenset(peer_saes)
        self._fair_use = fair_use
        self._max_key_count = max_key_count
        self._clock = clock
        # called with (caller SAE ID, HTTP status) for every answered request (metrics)
        self.observer: Callable[[str, int], None] | None = None
        # SAEs at other nodes, reached by key relay (None: only the peer node's SAEs)
        self.relay: RelayedKeys | None = None

    @classmethod
    def from_config(cls, config: DeliveryConfig, manager: KeyManager) -> DeliveryApp:
        return cls(
            manager=manager,
            limits=config.limits,
            kme_id=config.kme_id,
            peer_kme_id=config.peer_kme_id,
            local_saes=config.local_saes,
            peer_saes=config.peer_saes,
            fair_use=FairUse(
                FairUsePolicy(
                    keys_per_s=config.quota_keys_per_s,
                    burst_keys=config.quota_burst_keys,
                    key_size_bits=config.limits.key_size_bits,
                )
            ),
            max_key_count=config.max_key_count,
        )

    async def respond(self, method: str, target: str, body: bytes, caller_sae: str) -> Response:
        try:
            if caller_sae not in self._local_saes:
                raise ApiError(401, MSG_UNAUTHORIZED)
            request = parse_request(method, target, body, self.limits)
            relay = self._relay_for(request)
            if relay is None:
                authorize(
                    request, caller_sae, local_saes=self._local_saes, peer_saes=self._peer_saes
                )
            if isinstance(request, StatusRequest):
                return Response(200, self._status(caller_sae, request.slave_sae, relay))
            if isinstance(request, EncKeysRequest):
                response = await self._enc_keys(caller_sae, request, relay)
                if response.status != 200:
                    return await self._refused(response, caller_sae, method, target)
                return response
            assert isinstance(request, DecKeysRequest)
            keys = await (relay or self.manager).dec_keys(
                slave_sae=caller_sae, master_sae=request.master_sae, key_ids=request.key_ids
            )
            return Response(200, key_container_body(keys), (("cache-control", "no-store"),))
        except ApiError as exc:
            return await self._refused(Response(exc.status, exc.body()), caller_sae, method, target)
        except KeyStoreError as exc:
            _log.error("key store failure while serving", error=str(exc))
            return Response(503, error_body("key store failure"))

    async def _refused(
        self, response: Response, caller_sae: str, method: str, target: str
    ) -> Response:
        """``response`` (an error), once recorded in the audit trail; a store failure while
        recording answers 503 instead."""
        try:
            await self.manager.record_refusal(
                caller_sae,
                {
                    "status": response.status,
                    "method": method[:16],
                    "target": target,
                    "reason": _error_message(response.body),
                },
            )
        except KeyStoreError as exc:
            _log.error("key store failure while serving", error=str(exc))
            return Response(503, error_body("key store failure"))
        return response

    def _relay_for(self, request: Request) -> RelayedKeys | None:
        """The relay when the request's other SAE sits at a node reached by relay."""
        other = request.master_sae if isinstance(request, DecKeysRequest) else request.slave_sae
        if self.relay is None or other in self._peer_saes or not self.relay.serves(other):
            return None
        return self.relay

    def _status(self, master_sae: str, slave_sae: str, relay: RelayedKeys | None) -> bytes:
        if relay is not None:
            route = relay.route_to(slave_sae)
            return status_body(
                source_kme_id=self._kme_id,
                target_kme_id=route[-1],
                master_sae=master_sae,
                slave_sae=slave_sae,
                limits=self.limits,
                stored_key_count=relay.stored_key_count(master_sae, slave_sae),
                max_key_count=self._max_key_count,
                key_kind="qkd",
                relay_route=route,
            )
        return status_body(
            source_kme_id=self._kme_id,
            target_kme_id=self._peer_kme_id,
            master_sae=master_sae,
            slave_sae=slave_sae,
            limits=self.limits,
            stored_key_count=self.manager.stored_key_count(master_sae, slave_sae),
            max_key_count=self._max_key_count,
            key_kind=self.manager.key_kind(master_sae, slave_sae).value,
        )

    async def _enc_keys(
        self, master_sae: str, request: EncKeysRequest, relay: RelayedKeys | None
    ) -> Response:
        cost = self._fair_use.cost(number=request.number, size_bits=request.size_bits)
        try:
            self._fair_use.acquire(master_sae, cost, now=self._clock())
        except QuotaExceeded as exc:
            retry = exc.retry_after_s
            headers = () if math.isinf(retry) else (("retry-after", str(math.ceil(retry))),)
            message = (
                "request larger than this SAE's key quota"
                if math.isinf(retry)
                else "key quota of this SAE exceeded; retry later"
            )
            return Response(429, error_body(message), headers)  # recorded by ``respond``
        try:
            keys = await (relay or self.manager).enc_keys(
                master_sae=master_sae,
                slave_sae=request.slave_sae,
                number=request.number,
                size_bits=request.size_bits,
            )
        except (ApiError, KeyStoreError):
            self._fair_use.refund(master_sae, cost, now=self._clock())
            raise
        return Response(200, key_container_body(keys), (("cache-control", "no-store"),))


def _client_address(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return str(address[0]) if isinstance(address, tuple) else str(address)


def _certificate_refusal(cause: BaseException | None) -> dict[str, AuditValue] | None:
    """The audit fields of a handshake refused for the client's certificate (verification
    failed, or none was sent); None for any other handshake failure (a port scan, a client
    without a common protocol version)."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        return {"error": "SSLCertVerificationError", "reason": str(cause.verify_message)}
    if isinstance(cause, ssl.SSLError) and cause.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return {"error": "SSLError", "reason": "no client certificate"}
    return None


def _error_message(body: bytes) -> str:
    """The ``message`` of an ETSI 014 error body (ours: never key material)."""
    try:
        message = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        return ""
    return message if isinstance(message, str) else ""


# ---- HTTP over trio streams -------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DeliveryServer:
    """Serves a :class:`DeliveryApp` over mutual TLS and, optionally, a Unix socket."""

    def __init__(self, app: DeliveryApp, limits: ServerLimits) -> None:
        self.app = app
        self.limits = limits
        self.active_connections = 0
        self._too_large = f"request body larger than {limits.max_body_bytes} bytes"
        # the TLS context of connections accepted from now on (set by ``serve_tls``)
        self.ssl_context: ssl.SSLContext | None = None

    async def serve_tls(
        self,
        ssl_context: ssl.SSLContext,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0 = any free port); ``started`` reports the bound address.
        Each connection uses ``self.ssl_context`` as it is when the connection is accepted."""
        self.ssl_context = ssl_context
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        task_status.started((bound[0], bound[1]))

        async def handler(stream: trio.SocketStream) -> None:
            context = self.ssl_context
            assert context is not None
            await self._guarded(stream, lambda: self._tls_connection(stream, context))

        await trio.serve_listeners(handler, listeners)

    async def serve_unix(
        self,
        path: Path,
        sae_id: str,
        *,
        mode: int = 0o600,
        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The same API on a Unix socket; every connection acts as ``sae_id``.

        The socket is created with ``mode`` (never wider, even for an instant): its file
        permissions decide who may fetch keys.
        """
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError("delivery.unix_socket_path", f"a socket path, {path} is a file")
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~mode)
        try:
            await sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(self.limits.max_connections)
        listener = trio.SocketListener(sock)
        task_status.started(path)

        async def handler(stream: trio.SocketStream) -> None:
            await self._guarded(stream, lambda: self._http(stream, sae_id))

        try:
            await trio.serve_listeners(handler, [listener])
        finally:
            path.unlink(missing_ok=True)

    async def _guarded(self, stream: trio.abc.Stream, run: Callable[[], Awaitable[None]]) -> None:
        if self.active_connections >= self.limits.max_connections:
            await trio.aclose_forcefully(stream)
            return
        self.active_connections += 1
        try:
            await run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: nothing to answer
        except Exception as exc:
            _log.error("delivery connection failed", error=type(exc).__name__)
        finally:
            self.active_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _tls_connection(self, tcp: trio.SocketStream, context: ssl.SSLContext) -> None:
        tls = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
        client = _client_address(tcp)
        with trio.move_on_after(self.limits.handshake_timeout_s) as deadline:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                # no certificate, another CA, expired, revoked: refused at the TLS layer
                cause = exc.__cause__
                _log.info("TLS handshake refused", reason=str(cause or exc)[:200])
                refusal = _certificate_refusal(cause)
                if refusal is not None:
                    await self._record_certificate_refusal(client, refusal)
                return
        if deadline.cancelled_caught:
            _log.info("TLS handshake timed out")
            return
        try:
            certificate = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            require_purpose(certificate, Purpose.SAE)
        except (CertificateRejected, ValueError) as exc:
            error = type(exc).__name__ if isinstance(exc, CertificateRejected) else "malformed"
            await self._refuse_certificate(tls, client, error, str(exc))
            return
        sae_id = certificate_sae_id(tls.getpeercert())
        if sae_id is None:
            await self._refuse_certificate(
                tls, client, "CertificateRejected", "client certificate without a single CN"
            )
            return
        await self._http(tls, sae_id)

    async def _record_certificate_refusal(self, client: str, fields: dict[str, AuditValue]) -> None:
        try:
            await self.app.manager.record_certificate_refusal(client, fields)
        except KeyStoreError as exc:
            _log.error("key store failure while serving", error=str(exc))

    async def _refuse_certificate(
        self, stream: trio.abc.Stream, client: str, error: str, reason: str
    ) -> None:
        """Record the refusal, answer the connection's first request with 401 naming
        ``reason``, and close it."""
        _log.info("client certificate refused", error=error, reason=reason[:200])
        await self._record_certificate_refusal(client, {"error": error, "reason": reason})
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        with trio.move_on_after(self.limits.request_timeout_s):
            with contextlib.suppress(_Reject, h11.RemoteProtocolError):  # answered all the same
                await self._read_request(stream, conn)
            await self._send(stream, conn, 401, error_body(reason), (), close=True)

    async def _http(self, stream: trio.abc.Stream, sae_id: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        while True:
            outcome: tuple[h11.Request, bytes] | None = None
            with trio.move_on_after(self.limits.request_timeout_s) as deadline:
                try:
                    outcome = await self._read_request(stream, conn)
                except _Reject as reject:
                    await self._send(
                        stream, conn, reject.status, error_body(reject.message), (), close=True
                    )
                    return
                except h11.RemoteProtocolError:
                    await self._send(
                        stream, conn, 400, error_body("malformed HTTP request"), (), close=True
                    )
                    return
            if deadline.cancelled_caught:
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                    await self._send(
                        stream, conn, 408, error_body("request timeout"), (), close=True
                    )
                return
            if outcome is None:
                return
            request, body = outcome
            response = await self.app.respond(
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"),
                body,
                sae_id,
            )
            if self.app.observer is not None:
                self.app.observer(sae_id, response.status)
            if not await self._send(stream, conn, response.status, response.body, response.headers):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
            elif isinstance(event, h11.Request):
                request = event
                # h11 bounds only headers that arrive in pieces; bound them all the same
                header_bytes = len(event.target) + sum(
                    len(n) + len(v) + 4 for n, v in event.headers
                )
                if header_bytes > self.limits.max_header_bytes:
                    raise _Reject(400, "malformed HTTP request")
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > self.limits.max_body_bytes:
                        raise _Reject(400, self._too_large)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.max_body_bytes:
                    raise _Reject(400, self._too_large)
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, b"".join(chunks)
            else:  # ConnectionClosed, or PAUSED (cannot happen before EndOfMessage)
                return None

    async def _send(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        status: int,
        body: bytes,
        extra_headers: tuple[tuple[str, str], ...],
        *,
        close: bool = False,
    ) -> bool:
        """Send one JSON response; False if the connection cannot carry more."""
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            *extra_headers,
        ]
        if close:
            headers.append(("connection", "close"))
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers))
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False
        with trio.move_on_after(self.limits.request_timeout_s) as scope:
            await stream.send_all(data)
        return not scope.cancelled_caught and not close


async def serve_delivery(
    config: DeliveryConfig,
    app: DeliveryApp,
    *,
    server: DeliveryServer | None = None,
    task_status: trio.TaskStatus[tuple[tuple[str, int], Path | None]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the TLS endpoint and, if configured, the Unix socket until cancelled (on ``server``,
    whose ``ssl_context`` the caller may set beforehand and replace, or a new one)."""
    if server is None:
        server = DeliveryServer(app, config.server)
    context = server.ssl_context or delivery_ssl_context(config)[0]
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            server.serve_tls, context, config.listen_host, config.listen_port
        )
        unix_path: Path | None = None
        if config.unix_socket_path is not None and config.unix_socket_sae is not None:
            unix_path = await nursery.start(
                partial(server.serve_unix, mode=config.unix_socket_mode),
                config.unix_socket_path,
                config.unix_socket_sae,
            )
        task_status.started((address, unix_path))
