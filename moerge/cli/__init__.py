"""The ``moerge`` command: one module per command group, each registering on :data:`main`
(:mod:`moerge.cli.root`). The layers below never import this package."""

from moerge.cli import bench, demo, evaluate, merge, moe, registry, retrieval, route, serve, symbolic, zoo  # noqa: F401
from moerge.cli.root import main

__all__ = ["main"]
