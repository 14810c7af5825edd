"""``python -m fastdecode`` is the ``fastdecode`` command."""

from fastdecode.cli import main

raise SystemExit(main())
