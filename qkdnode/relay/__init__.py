"""Key relay across trusted nodes, as a pure state machine (docs/relay.md).

- ``messages``: ``Forward``, ``Prepared``, ``Decide``, ``Outcome`` between neighbours on a
  route, their strict schemas and wire forms;
- ``events``: the machine's inputs and effects, the stored ``RelayRecord`` and the read-only
  views of the store and the pad streams;
- ``payload``: the hop's one-time pad and the end-to-end confirmation tag;
- ``machine``: ``RelayMachine``, every relay through one node: two-phase commit along the
  route, one pad bit per relayed bit per hop, crash-safe by storing before sending.

No I/O, no clock, no randomness of its own: the trio shell and the deterministic simulation
(``qkdnode.simulation.relay_world``) feed it inputs and apply its effects.
"""
