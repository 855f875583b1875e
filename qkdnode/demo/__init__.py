"""``qkdnode demo``: Alice and Bob as two real ``qkdnode run`` processes on loopback.

- ``run``: the work directory (PKI, configs), starting and stopping the nodes, comparing their
  stores and fetching keys through the API, ``run_demo``;
- ``bootstrap``: the trust anchor of the first session (PKI, PSK or web of trust) and the
  ``[auth]`` lines of the configs;
- ``progress``: following the nodes' JSON logs (``LogFollower``) into public counts (``Progress``);
- ``display``: the terminal view of that progress (``DemoDisplay``).
"""
