"""Triton kernels of fastdino: one file per op, kernels plus a launcher."""

# The largest element offset (or count) an int32 holds: an op whose kernel indexes a tensor (or
# part of one) in 32 bits refuses, in its reasons, inputs that would need more.
INDEX_LIMIT = 2**31 - 1
# The most rows (or columns) a Triton kernel numbers in int32 as `program * BLOCK + arange(BLOCK)`:
# the last tile overhangs them by up to 1024 (the widest tile along a numbered dim), and past this
# the overhang would wrap negative, where the mask `index < rows` lets it through.
TILED_LIMIT = 2**31 - 1 - 1024
# The most programs (CUDA blocks) one launch may have: all along grid axis 0, as axes 1 and 2 stop
# at 65535.
GRID_LIMIT = 2**31 - 1


def tiled_reasons(counts) -> list[str]:
    """Why a Triton kernel cannot number these (argument, what, count) rows or columns in int32."""
    return [f"{name} has {count} {what}; the Triton kernel numbers them with 32-bit integers "
            "(limit 2**31 - 1025)" for name, what, count in counts if count > TILED_LIMIT]
