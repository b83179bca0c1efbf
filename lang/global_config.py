"""``sgl.global_config``: SGLang's process-wide frontend settings object.

SGLang programs read and write it directly (``sgl.global_config.default_backend``), so it exists;
``default_backend`` is the same slot ``sgl.set_default_backend`` fills.

    >>> import sglite as sgl
    >>> sgl.global_config.default_backend is sgl.get_default_backend()
    True
"""

from __future__ import annotations

from sglite.lang.backends.base import Backend, get_default_backend, set_default_backend


class GlobalConfig:
    """SGLang's ``GlobalConfig`` fields; those marked no-op are accepted for compatibility only."""

    def __init__(self) -> None:
        self.verbosity = 0
        """No-op: programs print nothing either way."""
        self.skip_special_tokens_in_output = True
        """Sent as each gen's ``skip_special_tokens`` by the native backends (as SGLang's client does)."""
        self.spaces_between_special_tokens_in_out = True
        """No-op: fast tokenizers never insert spaces between special tokens."""
        self.enable_precache_with_tracing = True
        """No-op: shared prefixes are cached by the radix tree as programs run."""
        self.enable_parallel_encoding = True
        """No-op: forks always share their prefix's KV."""

    @property
    def default_backend(self) -> Backend | None:
        return get_default_backend()

    @default_backend.setter
    def default_backend(self, backend: Backend | None) -> None:
        set_default_backend(backend)


global_config = GlobalConfig()
"""The one instance SGLang programs use (``sgl.global_config``)."""
