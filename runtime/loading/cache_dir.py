"""Where sglite keeps what it builds once per machine: converted GGUF folders, tiny test checkpoints.

``$SGLITE_CACHE`` (default ``~/.cache/sglite``) is a per-user location, like ``HF_HOME``, not an engine
option: it is read here, when a cache entry is looked up, and nowhere else.

    >>> sglite_cache_dir({"SGLITE_CACHE": "/data/sglite"})
    PosixPath('/data/sglite')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def sglite_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$SGLITE_CACHE`` from ``environ`` (default ``os.environ``), else ``~/.cache/sglite``."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("SGLITE_CACHE") or Path.home() / ".cache" / "sglite").expanduser()
