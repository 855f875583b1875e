"""Key delivery to consumers (SAEs): ETSI GS QKD 014 over mutual TLS and a Unix socket.

``api`` (pure parsing and responses), ``fairuse`` (pure per-SAE quotas), ``keys`` (the key
manager over the key store, in step with the peer node) and ``server`` (h11 over trio).
"""
