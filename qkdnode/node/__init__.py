"""The node's trio shell: the peer session (``session``) around the pure channel protocol."""
