"""qkdnode: a quantum key distribution node daemon.

The pure core (``qkdnode.channel``, ``qkdnode.postprocess``) does no I/O; the shell around it
(``qkdnode.link``, ``qkdnode.store``, ``qkdnode.node``, ``qkdnode.delivery``, ``qkdnode.ops``)
drives it with trio.
"""

__version__ = "0.1.0"
