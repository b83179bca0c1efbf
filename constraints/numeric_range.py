"""Regexes for bounded numbers: JSON schema ``minimum``/``maximum`` that outlines-core ignores.

outlines-core renders ``{"type": "integer", "minimum": 1, "maximum": 12}`` as any integer, so
a sampled ``37`` would fail ``jsonschema.validate``. These pure functions build the exact
language instead: digit-by-digit range decomposition for integers, and for decimals the
integer part split at the bounds plus a fraction constrained digit by digit (fractions compare
lexicographically once trailing zeros are dropped). Bounded numbers are written in fixed-point
(no exponent), which JSON accepts.

    >>> import re
    >>> rx = integer_range_regex(-5, 120)
    >>> [bool(re.fullmatch(rx, s)) for s in ("-5", "0", "120", "121", "-6", "007")]
    [True, True, True, False, False, False]
    >>> bool(re.fullmatch(number_range_regex(Decimal("0.5"), Decimal("2")), "1.75"))
    True
"""

from __future__ import annotations

from decimal import Decimal

from sglite.constraints.errors import ConstraintError

# A fraction bound: (digits after the point without trailing zeros, inclusive?). "" is zero.
_FracBound = tuple[str, bool] | None


def integer_range_regex(minimum: int | None, maximum: int | None) -> str:
    """Canonical JSON integers ``n`` with ``minimum <= n <= maximum`` (``None``: unbounded).

    No leading zeros and no ``-0``, so every string names a distinct integer.
    """
    if minimum is not None and maximum is not None and minimum > maximum:
        raise ConstraintError(f"empty integer range: minimum {minimum} > maximum {maximum}")
    parts: list[str] = []
    if maximum is None or maximum >= 0:
        parts.append(_uint_range(max(minimum, 0) if minimum is not None else 0, maximum))
    if minimum is None or minimum < 0:
        low_magnitude = -maximum if maximum is not None and maximum < 0 else 1
        high_magnitude = -minimum if minimum is not None else None
        parts.append("-" + _group(_uint_range(low_magnitude, high_magnitude)))
    return _group("|".join(parts))


def number_range_regex(
    minimum: Decimal | None,
    maximum: Decimal | None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> str:
    """Fixed-point JSON numbers ``x`` within the bounds (each ``None`` for unbounded)."""
    if minimum is not None and maximum is not None:
        empty = minimum > maximum or (minimum == maximum and (exclusive_minimum or exclusive_maximum))
        if empty:
            raise ConstraintError(f"empty number range: minimum {minimum} and maximum {maximum} admit no value")
    parts: list[str] = []
    if maximum is None or maximum > 0 or (maximum == 0 and not exclusive_maximum):
        if minimum is None or minimum < 0:
            low, low_exclusive = Decimal(0), False
        else:
            low, low_exclusive = minimum, exclusive_minimum
        part = _unsigned_decimal_range(low, low_exclusive, maximum, exclusive_maximum)
        if part:
            parts.append(part)
    if minimum is None or minimum < 0:
        # x = -y; y > 0 strictly so that "-0" and "-0.0" never appear.
        if maximum is not None and maximum < 0:
            low, low_exclusive = -maximum, exclusive_maximum
        else:
            low, low_exclusive = Decimal(0), True
        high = -minimum if minimum is not None else None
        part = _unsigned_decimal_range(low, low_exclusive, high, exclusive_minimum)
        if part:
            parts.append("-" + _group(part))
    if not parts:
        raise ConstraintError(f"empty number range: minimum {minimum} and maximum {maximum} admit no value")
    return _group("|".join(parts))


# ---- integers ---------------------------------------------------------------------------


def _uint_range(low: int, high: int | None) -> str:
    """Non-negative canonical integers in ``[low, high]``; ``high=None`` is unbounded."""
    if high is None:
        width = len(str(low))
        longer = f"[1-9][0-9]{{{width},}}"
        return _group(_uint_range(low, 10**width - 1) + "|" + longer)
    parts = []
    for width in range(len(str(low)), len(str(high)) + 1):
        first = 0 if width == 1 else 10 ** (width - 1)
        lo, hi = max(low, first), min(high, 10**width - 1)
        if lo <= hi:
            parts.append(_same_width(str(lo), str(hi)))
    return _group("|".join(parts))


def _same_width(lo: str, hi: str) -> str:
    """Digit strings of one width between ``lo`` and ``hi`` inclusive (zeros allowed inside)."""
    if lo == hi:
        return lo
    if len(lo) == 1:
        return _digit_class(int(lo), int(hi))
    if set(lo) == {"0"} and set(hi) == {"9"}:
        return f"[0-9]{{{len(lo)}}}"
    if lo[0] == hi[0]:
        return lo[0] + _group(_same_width(lo[1:], hi[1:]))
    rest = len(lo) - 1
    parts = [lo[0] + _group(_same_width(lo[1:], "9" * rest))]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(_digit_class(int(lo[0]) + 1, int(hi[0]) - 1) + f"[0-9]{{{rest}}}")
    parts.append(hi[0] + _group(_same_width("0" * rest, hi[1:])))
    return _group("|".join(parts))


# ---- decimals ---------------------------------------------------------------------------


def _split(value: Decimal) -> tuple[int, str]:
    """``Decimal("12.50") -> (12, "5")``: integer part and fraction digits without trailing zeros."""
    text = format(value, "f")
    whole, _, fraction = text.partition(".")
    return int(whole), fraction.rstrip("0")


def _unsigned_decimal_range(
    low: Decimal, low_exclusive: bool, high: Decimal | None, high_exclusive: bool
) -> str | None:
    """Non-negative fixed-point numbers in the range, or ``None`` when it is empty."""
    low_int, low_frac = _split(low)
    low_bound: _FracBound = (low_frac, not low_exclusive)
    if high is None:
        parts = [_with_fraction(str(low_int), *_fraction(low_bound, None))]
        parts.append(_with_fraction(_uint_range(low_int + 1, None), "[0-9]+", True))
    else:
        high_int, high_frac = _split(high)
        high_bound: _FracBound = (high_frac, not high_exclusive)
        if low_int == high_int:
            parts = [_with_fraction(str(low_int), *_fraction(low_bound, high_bound))]
        else:
            parts = [_with_fraction(str(low_int), *_fraction(low_bound, None))]
            if high_int - low_int > 1:
                parts.append(_with_fraction(_uint_range(low_int + 1, high_int - 1), "[0-9]+", True))
            parts.append(_with_fraction(str(high_int), *_fraction(None, high_bound)))
    present = [p for p in parts if p is not None]
    return _group("|".join(present)) if present else None


def _with_fraction(integer: str, fraction: str | None, bare_ok: bool) -> str | None:
    """An integer-part regex followed by ``.digits`` matching ``fraction`` (optional if ``bare_ok``)."""
    if fraction is None:
        return _group(integer) if bare_ok else None
    suffix = rf"(?:\.{_group(fraction)})"
    return _group(integer) + (suffix + "?" if bare_ok else suffix)


def _fraction(low: _FracBound, high: _FracBound) -> tuple[str | None, bool]:
    """Non-empty fraction digit strings ``f`` with ``low <= 0.f <= high``, and whether no fraction fits.

    Returns ``(regex or None when none fits, bare_ok)``. ``bare_ok`` says the value with no
    fraction (zero) satisfies the bounds. Recursion peels one digit off each bound.
    """
    if low == ("", True):
        low = None  # 0.f >= 0 always holds
    if high == ("", False):
        return None, False  # 0.f < 0 never holds
    above_zero = low == ("", False)
    zero_only = high == ("", True)
    if (low is None or above_zero) and (high is None or zero_only):
        if above_zero and zero_only:
            return None, False
        if above_zero:
            return "0*[1-9][0-9]*", False
        if zero_only:
            return "0+", True
        return "[0-9]+", True
    bare_ok = low is None  # an empty fraction is zero, below any nonzero lower bound
    by_tail: dict[str, list[int]] = {}
    for digit in range(10):
        tail_low, tail_high = _peel(low, digit, lower=True), _peel(high, digit, lower=False)
        if tail_low is _NEVER or tail_high is _NEVER:
            continue
        tail, tail_bare = _fraction(tail_low, tail_high)
        if tail is None and not tail_bare:
            continue
        if tail is None:
            rendered = ""
        elif tail == "[0-9]+" and tail_bare:
            rendered = "[0-9]*"
        else:
            rendered = _group(tail) + ("?" if tail_bare else "")
        by_tail.setdefault(rendered, []).append(digit)
    if not by_tail:
        return None, bare_ok
    alternatives = [_digits_class(digits) + tail for tail, digits in by_tail.items()]
    return "|".join(alternatives), bare_ok


_NEVER = ("never", False)


def _peel(bound: _FracBound, digit: int, *, lower: bool) -> _FracBound:
    """The bound on the rest of the fraction once its first digit is ``digit`` (``_NEVER``: impossible)."""
    if bound is None:
        return None
    digits, inclusive = bound
    if digits == "":
        # Only "above zero" (lower) and "zero only" (upper) reach here.
        if lower:
            return None if digit > 0 else bound
        return bound if digit == 0 else _NEVER
    first = int(digits[0])
    if digit == first:
        return (digits[1:], inclusive)
    if lower:
        return None if digit > first else _NEVER
    return None if digit < first else _NEVER


# ---- rendering --------------------------------------------------------------------------


def _digit_class(low: int, high: int) -> str:
    return str(low) if low == high else f"[{low}-{high}]"


def _digits_class(digits: list[int]) -> str:
    if len(digits) == 1:
        return str(digits[0])
    if digits == list(range(digits[0], digits[-1] + 1)):
        return f"[{digits[0]}-{digits[-1]}]"
    return "[" + "".join(map(str, digits)) + "]"


def _group(regex: str) -> str:
    return f"(?:{regex})"
