"""SGLang's module paths that programs import helpers from (``sglang.srt...``), mirrored so that a program
whose ``sglang`` became ``sglite`` keeps working. Only re-exports live here; the code is in ``lang/``."""
