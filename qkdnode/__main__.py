"""``python -m qkdnode``: the same as the ``qkdnode`` command."""

from qkdnode.cli import main

raise SystemExit(main())
