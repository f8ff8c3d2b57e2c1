"""`paigeant console`: a web console over the stores and streams the command line reads (the `console` extra).

Workflows at a glance and one by one, the dead-letter queue, and an inbox of the tool calls that wait for a person,
answered as a signed-in person. See docs/console.md.
"""

try:
    import jinja2  # noqa: F401  # pyright: ignore[reportUnusedImport]
    import python_multipart  # noqa: F401  # pyright: ignore[reportUnusedImport]
    import starlette  # noqa: F401  # pyright: ignore[reportUnusedImport]
    import uvicorn  # noqa: F401  # pyright: ignore[reportUnusedImport]
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(f'the console needs its extra: pip install "paigeant-ai[console]" ({_exc})') from _exc

from .app import Console, create_app
from .auth import Principal, Users

__all__ = ("Console", "Principal", "Users", "create_app")
