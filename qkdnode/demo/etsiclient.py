"""A keep-alive ETSI GS QKD 014 client over mutual TLS (h11 on trio), for the benchmarks.

One ``EtsiClient`` holds one TLS connection to one KME as one SAE and sends requests on it
one after the other, as a real SAE's HTTP client with keep-alive does.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import h11
import trio

from qkdnode.ops import issuance


def sae_tls_context(ca_directory: Path, pki_directory: Path, sae: str) -> ssl.SSLContext:
    """The TLS context of SAE ``sae``: its certificate and key in ``pki_directory``, the KME
    certificates' CA in ``ca_directory``."""
    context = ssl.create_default_context(cafile=str(ca_directory / issuance.CA_CERT))
    context.load_cert_chain(pki_directory / f"{sae}.pem", pki_directory / f"{sae}.key")
    return context


class EtsiClient:
    """One keep-alive HTTPS connection driven by h11."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext) -> EtsiClient:
        return cls(await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``target``; the status and the response body."""
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        data = self.conn.send(
            h11.Request(
                method="POST",
                target=target,
                headers=[("host", "localhost"), ("content-length", str(len(body)))],
            )
        )
        await self.stream.send_all(
            (data or b"")
            + (self.conn.send(h11.Data(data=body)) or b"")
            + (self.conn.send(h11.EndOfMessage()) or b"")
        )
        status, chunks = 0, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            else:
                raise RuntimeError(f"unexpected {event!r}")
