"""The llguidance backend: JSON schemas, regexes, choices and Lark/GBNF grammars as token matchers.

llguidance compiles a constraint to a grammar (a lazily built lexer DFA plus an Earley parser,
so recursion and the whole of JSON Schema's structure need no up-front automaton) and answers,
per step, a bitmask of allowed tokens. Per request it keeps one
``LLMatcher`` (a deep copy of a cached, validated prototype); per step the bitmask becomes an
additive 0/-inf bias, cached by the mask's bytes, so applying it is one ``add_``, as on the
outlines-core path. ``compute_ff_tokens`` drives jump-forward.

A JSON schema is first rewritten into what the grammar enforces exactly (``schema_rewrite``:
formats as patterns, ECMA patterns as Rust regexes, exclusive ``oneOf`` as ``anyOf``,
dependencies, ``not``). Nothing is dropped silently: what is still relaxed (a keyword
llguidance does not implement, an overlapping ``oneOf``, a lookaround) is named in one warning,
and every finished output is validated against the full schema (``output_check``). With
``strict`` any relaxation is a ``ConstraintError`` naming the keyword and its JSON pointer.

    >>> backend = GuidanceBackend(tokenizer, vocab_size, eos_token_ids={2})       # doctest: +SKIP
    >>> proc = backend.processor(ConstraintSpec.from_params(regex=r"[0-9]{3}"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sglite.constraints.byte_cache import ByteLRU
from sglite.constraints.compiler import regex_for_choices
from sglite.constraints.errors import ConstraintError
from sglite.constraints.json_schema import normalize_schema
from sglite.constraints.limits import ConstraintLimits
from sglite.constraints.ecma_regex import ecma_compiles
from sglite.constraints.json_indent import IndentedProcessor, TokenTable
from sglite.constraints.regex_syntax import check_groups_balanced, diagnose_regex, normalize_regex
from sglite.constraints.output_check import SchemaChecker
from sglite.constraints.schema_keywords import describe
from sglite.constraints.schema_refs import check_local_refs, check_recursion_terminates, embed_remote_refs
from sglite.constraints.schema_rewrite import PreparedSchema, prepare_schema
from sglite.constraints.spec import ConstraintSpec

logger = logging.getLogger(__name__)

PARALLEL_MASK_ROWS = 32
"""Rows from which a batch's bitmasks are filled on llguidance's thread pool: a mask takes tens of
microseconds, while waking the pool costs milliseconds on a busy machine, so small batches go serially."""
MAX_COMPILE_ATTEMPTS = 4
"""Compiles of one schema: the first, then after reshaping a recursive root or relaxing a pattern."""
MAX_PATTERNS_CHECKED = 500
"""Patterns checked one by one to name the one that broke a compile."""


@dataclass(frozen=True)
class CompiledGrammar:
    """A validated llguidance grammar, a prototype matcher to copy per request, and its warnings."""

    grammar: str
    prototype: object  # llguidance.LLMatcher
    warnings: tuple[str, ...]
    size_bytes: int
    checker: SchemaChecker | None = None
    """JSON schema: validates finished outputs against the full schema."""
    relaxed: tuple[str, ...] = ()
    """JSON schema: the keywords relaxed (checked on the output only), one entry per place."""
    enforced: tuple[tuple[str, int], ...] = ()
    """JSON schema: keywords rewritten into an enforceable form, with counts."""


def add_bias(logits: torch.Tensor, bias: torch.Tensor) -> None:
    """``logits += bias`` in place. A CPU float32 row goes through numpy: one thread, where torch would wake
    its intra-op pool for every row of a batch (milliseconds a row on a busy machine, for a 20 µs add)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        row = logits.numpy()
        np.add(row, bias.numpy(), out=row)
    else:
        logits.add_(bias)


class GuidanceBackend:
    """Compiles ``ConstraintSpec``s with llguidance over one tokenizer; owns its caches (bounded in bytes)."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int] | frozenset[int],
                 limits: ConstraintLimits | None = None) -> None:
        import llguidance
        import llguidance.hf

        self.limits = limits or ConstraintLimits()
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_token_ids |= {int(tokenizer.eos_token_id)}
        # The one-time cost (~1.5 s for 49k tokens): a trie of every token's bytes.
        try:
            self.lltokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(self.eos_token_ids))
        except ValueError as exc:  # a slow (Python) tokenizer
            raise ConstraintError(f"the llguidance backend needs a fast (Rust) tokenizer ({exc}); "
                                  "use grammar_backend='outlines'") from None
        self.mask_words = (self.lltokenizer.vocab_size + 31) // 32
        self._llguidance = llguidance
        self._parser_limits = llguidance.LLParserLimits(max_grammar_size=self.limits.max_grammar_size)
        self._grammars: ByteLRU[CompiledGrammar] = ByteLRU(self.limits.compiled_cache_bytes)
        self._biases: ByteLRU[torch.Tensor] = ByteLRU(self.limits.bias_cache_bytes)
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.executor = llguidance.LLExecutor()  # computes a batch's masks on Rust threads
        self._token_table: TokenTable | None = None

    # ---- compile ------------------------------------------------------------------------------

    def compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        """The cached, validated grammar of ``spec``; raises ``ConstraintError`` naming the problem."""
        compiled = self._grammars.get(spec.digest)
        if compiled is not None:
            return compiled
        with self._lock:
            build_lock = self._building.setdefault(spec.digest, threading.Lock())
        with build_lock:  # one compile per constraint at a time; others wait for its result
            compiled = self._grammars.get(spec.digest)
            if compiled is None:
                try:
                    compiled = self._compile(spec)
                finally:
                    with self._lock:
                        self._building.pop(spec.digest, None)
                self._grammars.put(spec.digest, compiled, compiled.size_bytes)
        return compiled

    def _grammar(self, spec: ConstraintSpec, copy_root: bool = False,
                 unsupported: frozenset[str] = frozenset()) -> tuple[str, PreparedSchema | None]:
        """(llguidance grammar text, the prepared schema or None) of ``spec``."""
        matcher = self._llguidance.LLMatcher
        if spec.kind == "json_schema":
            if len(spec.source) > self.limits.max_schema_chars:
                raise ConstraintError(
                    f"json_schema is {len(spec.source):,} characters, over the limit of "
                    f"{self.limits.max_schema_chars:,}; send a smaller schema"
                )
            schema = normalize_schema(spec.source)
            if schema is False:
                raise ConstraintError("json_schema is `false`: no document is valid, so nothing can be generated")
            if schema is True:
                schema = {}
            schema = embed_remote_refs(schema)
            check_local_refs(schema)
            check_recursion_terminates(schema)
            prepared = prepare_schema(schema, copy_root, unsupported)
            if spec.strict and prepared.relaxed:
                raise ConstraintError(
                    f"json_schema: {prepared.relaxed[0]} cannot be enforced exactly; change the schema, or drop "
                    "strict to generate with it relaxed (the finished output is then checked: schema_valid)"
                )
            layout = spec.json_layout
            relax = not spec.strict
            options: dict = {"lenient": relax, "coerce_one_of": relax}
            if layout.is_flexible:
                options.update(whitespace_flexible=True, whitespace_pattern=layout.whitespace_pattern)
            else:
                options.update(whitespace_flexible=False, item_separator=layout.item_separator,
                               key_separator=layout.key_separator)
            return matcher.grammar_from_json_schema(prepared.schema, overrides=options), prepared
        if spec.kind == "ebnf":
            text = spec.source
            if "::=" in text:  # GBNF / xgrammar EBNF (SGLang's ebnf): convert to Lark
                from llguidance.gbnf_to_lark import gbnf_to_lark

                try:
                    text = gbnf_to_lark(text)
                except Exception as exc:  # the converter raises plain exceptions on bad input
                    raise ConstraintError(f"ebnf: not a valid GBNF grammar: {exc}") from None
            if len(text) > self.limits.max_grammar_chars:
                raise ConstraintError(f"ebnf grammar is {len(text):,} characters, over the limit of "
                                      f"{self.limits.max_grammar_chars:,}")
            return matcher.grammar_from_lark(text), None
        regex = regex_for_choices(spec.choices, max_bytes=self.limits.max_choices_bytes) \
            if spec.kind == "choices" else spec.source
        if len(regex) > self.limits.max_regex_chars:
            raise ConstraintError(f"{spec.kind}: the regex is {len(regex):,} characters, over the limit of "
                                  f"{self.limits.max_regex_chars:,}")
        regex = normalize_regex(regex)
        check_groups_balanced(regex)
        return matcher.grammar_from_regex(regex), None

    def _compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        copy_root, unsupported = False, frozenset()
        for _ in range(MAX_COMPILE_ATTEMPTS):
            grammar, prepared = self._grammar(spec, copy_root, unsupported)
            # One compile, in Rust with the GIL released, bounded by the parser limits; it never raises.
            prototype = self._llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=self._parser_limits)
            if prepared is None or not prototype.is_error():
                break
            error = prototype.get_error()
            if "circular references with sibling keys" in error and not copy_root:
                copy_root = True  # the other shape of a recursive root (schema_rewrite)
                continue
            if "regex" not in error and "lookaround" not in error:
                break
            bad = self._bad_pattern(prepared)
            if bad is None:
                break
            keyword, pointer, original, why = bad
            if ecma_compiles(original) and original not in unsupported:
                unsupported |= {original}  # a valid regex Rust's engine rejects: relax it, check the output
                continue
            raise ConstraintError(f"json_schema: {keyword!r} at {pointer or '(root)'}: the regex {original!r} "
                                  f"does not compile: {why}")
        schema = prepared.original if prepared is not None else None  # pointers the user can find
        if prototype.is_error():
            raise self._error(spec, schema, prototype.get_error())
        messages = list(prototype.get_grammar_warnings())
        if messages and spec.kind == "json_schema" and spec.strict:
            raise ConstraintError(
                f"json_schema: {describe(schema, messages[0])} cannot be enforced exactly; change the schema, "
                "or drop strict to generate with it relaxed (the finished output is then checked: schema_valid)"
            )
        relaxed = tuple(str(r) for r in prepared.relaxed) + tuple(describe(schema, m) for m in messages) \
            if prepared is not None else ()
        warnings = (f"json_schema relaxed (the finished output is checked against the full schema): "
                    f"{'; '.join(relaxed)}",) if relaxed else ()
        # The first mask builds the lexer states of the start (0.1 s for a 10k-value enum); copies share
        # them, so build them here, in the caller's thread, instead of in the step loop.
        prototype.compute_bitmask()
        # The Rust-side size is not observable; charge the grammar text several times over plus a floor.
        checker = SchemaChecker(prepared.original) if prepared is not None else None
        return CompiledGrammar(grammar, prototype, warnings, size_bytes=8 * len(grammar) + 64 * 1024, checker=checker,
                               relaxed=relaxed, enforced=tuple(sorted(prepared.enforced.items())) if prepared else ())

    def _bad_pattern(self, prepared: PreparedSchema) -> tuple[str, str, str, str] | None:
        """``(keyword, pointer, regex, why)`` of the first pattern llguidance cannot parse (the slow path:
        ~1 ms a pattern, taken only after a compile failed on a regex)."""
        matcher = self._llguidance.LLMatcher
        for keyword, pointer, original, translated in prepared.patterns[:MAX_PATTERNS_CHECKED]:
            problem = matcher.validate_grammar(matcher.grammar_from_regex(translated))
            if problem:
                why = next((line.strip()[len("error:"):].strip() for line in problem.splitlines()
                            if line.strip().startswith("error:")), problem.splitlines()[0])
                return keyword, pointer, original, why
        return None

    def _error(self, spec: ConstraintSpec, schema, message: str) -> ConstraintError:
        first = message.strip().splitlines()[0] if message.strip() else message
        if spec.kind == "json_schema":
            return ConstraintError(f"json_schema cannot be compiled: {describe(schema, message)}")
        if spec.kind == "regex":
            detail = " ".join(line.strip() for line in message.splitlines() if line.strip().startswith("error:"))
            return diagnose_regex(normalize_regex(spec.source), detail or first)
        if spec.kind == "ebnf":
            return ConstraintError(f"ebnf grammar is invalid: {' '.join(message.split())[:500]}")
        return ConstraintError(f"choices cannot be compiled: {first}")

    # ---- per request --------------------------------------------------------------------------

    def processor(self, spec: ConstraintSpec, jump_forward: bool = True) -> GuidanceLogitsProcessor | IndentedProcessor:
        compiled = self.compile(spec)
        indent = spec.json_layout.indent if spec.kind == "json_schema" else None
        if indent is None:
            return GuidanceLogitsProcessor(self, compiled, jump_forward=jump_forward)
        # The grammar's own jump-forward would write canonical text where the layout owes a newline.
        inner = GuidanceLogitsProcessor(self, compiled, jump_forward=False)
        return IndentedProcessor(inner, self.token_table(), indent, jump_forward=jump_forward)

    def token_table(self) -> TokenTable:
        """Token texts and whitespace tokens for indented layouts (built on first use, ~0.1 s)."""
        with self._lock:
            if self._token_table is None:
                self._token_table = TokenTable(self.lltokenizer, self.mask_words)
            return self._token_table

    def bias(self, mask: np.ndarray, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The cached ``[width]`` 0/-inf row of a bitmask (ids past the mask are forbidden)."""
        key = (mask.tobytes(), width, str(device), dtype)
        bias = self._biases.get(key)
        if bias is None:
            # In numpy: torch's small-op dispatch made this miss path ~50x slower, and a random walk misses often.
            bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:width].astype(np.bool_)
            row = np.full(width, -np.inf, dtype=np.float32)
            row[: len(bits)][bits] = 0.0
            bias = torch.from_numpy(row).to(device=device, dtype=dtype)
            self._biases.put(key, bias, bias.numel() * bias.element_size() + len(key[0]))
        return bias

    def cache_info(self) -> dict[str, dict[str, int]]:
        return {"compiled": self._grammars.info(), "bias": self._biases.info()}

    def clear_caches(self) -> None:
        self._grammars.clear()
        self._biases.clear()


class GuidanceLogitsProcessor:
    """One request's llguidance matcher, driven by the step loop (``runtime.logits_processor``)."""

    def __init__(self, backend: GuidanceBackend, compiled: CompiledGrammar, jump_forward: bool = True) -> None:
        self.backend = backend
        self.matcher = compiled.prototype.deep_copy()
        self.warnings = compiled.warnings
        self.checker = compiled.checker
        self.jump_forward = jump_forward
        self.jump_forward_tokens = 0
        self.violation: str | None = None
        self._eos_accepted = False
        self._mask = np.zeros(backend.mask_words, dtype=np.int32)

    def _apply(self, logits: torch.Tensor) -> None:
        if self.matcher.is_error():  # only after a bypassed mask: let EOS end it
            self.violation = self.violation or self.matcher.get_error()
            self._mask[:] = 0
            bits = self._mask.view(np.uint8)  # little-endian words: token t is bit t % 8 of byte t // 8
            for t in self.backend.eos_token_ids:
                if t < self._mask.nbytes * 8:
                    bits[t // 8] |= 1 << (t % 8)
        add_bias(logits, self.backend.bias(self._mask, logits.shape[-1], logits.device, logits.dtype))

    @classmethod
    def mask_rows(cls, logits: torch.Tensor, rows: list[tuple[int, GuidanceLogitsProcessor]]) -> None:
        """``mask_logits`` for several rows: from ``PARALLEL_MASK_ROWS`` rows on, one backend's bitmasks in one
        parallel call."""
        from llguidance.numpy import fill_next_token_bitmask_par

        by_backend: dict[int, list[tuple[int, GuidanceLogitsProcessor]]] = {}
        for row, proc in rows:
            by_backend.setdefault(id(proc.backend), []).append((row, proc))
        for members in by_backend.values():
            if len(members) < PARALLEL_MASK_ROWS:
                for row, proc in members:
                    proc.mask_logits(logits[row])
                continue
            backend = members[0][1].backend
            masks = np.zeros((len(members), backend.mask_words), dtype=np.int32)
            fill_next_token_bitmask_par(backend.executor, [(p.matcher, i) for i, (_, p) in enumerate(members)], masks)
            for i, (row, proc) in enumerate(members):
                proc._mask[:] = masks[i]
                proc._apply(logits[row])

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Forbidden tokens of the ``[vocab]`` row -> ``-inf`` (one bitmask fill, one cached-bias ``add_``)."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        self._apply(logits)

    def accept_token(self, token_id: int) -> None:
        if self.is_finished():
            return
        token_id = int(token_id)
        if token_id in self.backend.eos_token_ids:
            if self.matcher.is_accepting():
                self._eos_accepted = True
            else:
                self.violation = f"EOS token {token_id} before the constraint was satisfied"
            return
        if not self.matcher.consume_token(token_id):
            self.violation = f"token {token_id} is not allowed here: {self.matcher.get_error().splitlines()[0]}"

    def is_finished(self) -> bool:
        """EOS accepted, a violation, or the grammar complete with nothing more allowed."""
        return self._eos_accepted or self.violation is not None or self.matcher.is_stopped()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (consumed here already); ``[]`` when none or disabled."""
        if not self.jump_forward or self.is_finished():
            return []
        forced = list(self.matcher.compute_ff_tokens())
        if forced and not self.matcher.consume_tokens(forced):
            self.violation = self.matcher.get_error().splitlines()[0]
            return []
        self.jump_forward_tokens += len(forced)
        return forced

    def allowed_token_ids(self) -> list[int]:
        """Ids allowed now, EOS included where the grammar may end (sorted; for tests and tools)."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        return [int(t) for t in np.nonzero(bits)[0] if t < self.backend.vocab_size]

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    def __repr__(self) -> str:
        return f"GuidanceLogitsProcessor(finished={self.is_finished()}, forced={self.jump_forward_tokens})"

