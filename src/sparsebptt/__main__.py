"""``python -m sparsebptt ...``: the same as the ``sparsebptt`` command."""
from .cli import main

raise SystemExit(main())
