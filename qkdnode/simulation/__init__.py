"""A deterministic simulation of two nodes and the network between them (no trio, no I/O).

Both nodes run the production ``PeerConnection``, authentication-key ledger and coordination
machine; only post-processing (a seeded stub), the stores (a model with the SQLite store's
semantics) and the network (drop, delay, duplicate, reorder, cut, forge, replay, an attacker's
own connections) are modelled. One seed drives everything, so a failing run replays step for
step. ``qkdnode.simulation.world.simulate_run`` runs one seed; ``scripts/simulate`` many.
"""
