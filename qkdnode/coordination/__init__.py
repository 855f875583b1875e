"""The node's coordination protocol between Alice and Bob, as a pure state machine.

- ``wire``: the typed coordination and block-data messages and their strict schemas on the
  classical channel (``Control`` and ``Data`` frames);
- ``machine``: ``Coordinator``, one session's limbo sync, block scheduling, turn framing,
  two-phase commit and ledger deposits; ``AuthPlanner``, the node's choice of authentication
  mode for its next connection.

No I/O, no clock, no randomness of its own: the trio shell (``qkdnode.node``) and the
deterministic simulation (``qkdnode.simulation``) feed it inputs and apply its effects.
"""
