"""One unit for memory everywhere: GiB (1024**3 bytes). Card sizes sold in GB (10**9 bytes) convert here."""

GIB = 1024**3
MIB = 1024**2
GB = 10**9


def to_gib(nbytes: float) -> float:
    """Bytes to GiB."""
    return nbytes / GIB


def gb_to_bytes(gb: float) -> int:
    """A card's marketed size in GB (10**9 bytes) to bytes."""
    return int(gb * GB)


def fmt_bytes(nbytes: float) -> str:
    """Human-readable size in binary units: GiB from 1 GiB up, MiB below, KiB below that."""
    if abs(nbytes) >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    if abs(nbytes) >= MIB:
        return f"{nbytes / MIB:.2f} MiB"
    return f"{nbytes / 1024:.1f} KiB"
