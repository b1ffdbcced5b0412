"""``python -m moerge.cli`` is the ``moerge`` command."""

import os

from moerge.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
main()
