"""Mirror of ``sglang.srt.constrained`` (see ``sglite/srt/__init__.py``)."""
