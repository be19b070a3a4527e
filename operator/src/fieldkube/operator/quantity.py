"""Kubernetes resource quantities as numbers: the spec derives one size from another (shm = memory / 2).

Only what the spec needs: parse a quantity string ("16Gi", "1.5G", "2e9", "512Mi") to a Decimal, and write
a byte count back as the shortest exact quantity, so a derived size reads like one a person would write.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1)} | {
    s: Decimal(10) ** (3 * i) for i, s in enumerate(("k", "M", "G", "T", "P", "E"), start=1)
}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|([a-zA-Z]*))$")


def parse_quantity(text: str) -> Decimal:
    """The value of a Kubernetes quantity (`resource.Quantity` syntax); ValueError when it is not one."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None
    if exponent:
        return value * Decimal(10) ** int(exponent[1:])
    suffix = suffix or ""
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    if suffix in _DECIMAL:
        return value * _DECIMAL[suffix]
    raise ValueError(f"{text!r} has an unknown quantity suffix {suffix!r}")


def format_bytes(count: int) -> str:
    """`count` bytes as the shortest exact quantity: binary suffixes first (8Gi), then decimal (1500M)."""
    if count <= 0:
        return str(count)
    for suffix, factor in sorted(_BINARY.items(), key=lambda item: -item[1]):
        if count % factor == 0:
            return f"{count // factor}{suffix}"
    for suffix in ("E", "P", "T", "G", "M", "k"):
        factor = int(_DECIMAL[suffix])
        if count % factor == 0:
            return f"{count // factor}{suffix}"
    return str(count)
