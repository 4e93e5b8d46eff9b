"""``python -m muse`` is the ``muse`` command."""

from muse._cli import main

raise SystemExit(main())
