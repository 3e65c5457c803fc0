"""Tile configurations for the Triton LoRA-expert kernels: a fixed-config heuristic plus CUDA-only autotune lists.

Legend (used in every file of this package)::

    T tokens, K slots per token, S = T*K slots, E experts, r rank, D = d_in, O = d_out
    BLOCK_M   slots per tile (forward and backward slot kernels; also sizes the tile map)
    BLOCK_K   d_in columns per step (shrink x @ A_e^T in the forward, dx = dh @ A_e in the backward)
    BLOCK_N   d_out columns per step (expand h @ B_e^T in the forward, z = g @ B_e in the backward)
    BLOCK_R   rank padded to max(16, next_pow2(r)); loads are masked, so padding costs registers only
    BLOCK_MW  slots per step of the weight-gradient loop (dA, dB)
    BLOCK_W   d_in / d_out columns owned by one weight-gradient program

Pure Python: importing this file needs neither triton nor a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MAX_RANK = 128


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division that also works on torch SymInts (no float round trip)."""
    return (a + b - 1) // b


def rank_block(r: int) -> int:
    """BLOCK_R = max(16, next_pow2(r)): a 16-bit tl.dot needs its reduction dim >= 16 on NVIDIA, and the expand's
    reduction dim is the rank."""
    return max(16, next_power_of_2(r))


@dataclass(frozen=True)
class TileConfig:
    """Fixed launch parameters of the three kernels (forward, backward slots, backward weights)."""

    block_m: int = 64
    block_k: int = 64
    block_n: int = 64
    block_r: int = 16
    block_mw: int = 32
    block_w: int = 64
    split_fwd: int = 1
    split_bwd: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        problems = []
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive int")
        for name in ("block_m", "block_k", "block_n", "block_r", "block_mw", "block_w"):
            value = getattr(self, name)
            if isinstance(value, int) and value >= 1 and (value & (value - 1) or value < 16):
                problems.append(f"{name}={value} must be a power of two >= 16 (tl.arange and tl.dot shapes)")
        if problems:
            raise ValueError("TileConfig: " + "; ".join(problems))

    def as_list(self) -> list[int]:
        """Flat int list, the form the torch.library custom ops take (their schema has no dataclasses)."""
        return [getattr(self, name) for name in _FIELD_NAMES]

    @classmethod
    def from_list(cls, values: list[int]) -> TileConfig:
        if len(values) != len(_FIELD_NAMES):
            raise ValueError(f"TileConfig.from_list: expected {len(_FIELD_NAMES)} ints {_FIELD_NAMES}, got {values}")
        return cls(**dict(zip(_FIELD_NAMES, (int(v) for v in values))))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _FIELD_NAMES}


# Field order of TileConfig, computed once (an immutable tuple). The methods use it instead of dataclasses.fields,
# which torch.compile cannot trace.
_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TileConfig))


def block_m_of(tile_config: list[int]) -> int:
    """BLOCK_M of a ``TileConfig.as_list()`` list, without rebuilding the dataclass."""
    return int(tile_config[_FIELD_NAMES.index("block_m")])


def choose_tile_config(
    num_slots: int,
    num_experts: int,
    rank: int,
    d_in: int,
    d_out: int,
    *,
    num_sms: int | None = None,
    element_size: int = 2,
) -> TileConfig:
    """Heuristic tile config from host-side shapes only (no device data, so no sync).

    Args:
        num_slots: S = T*K.
        num_experts: E.
        rank: r (1..128).
        d_in: D.
        d_out: O.
        num_sms: streaming multiprocessors of the CUDA device; None (CPU / interpreter) disables N/D splitting,
            whose only purpose is to fill an under-occupied GPU.
        element_size: bytes per element of x (2 for bf16/fp16, 4 for fp32).

    Rules: BLOCK_M follows the mean rows per expert S/E (16 for decode-like batches, 128 only when experts get
    >= 512 rows and the rank is small enough that the fp32 h tile [BLOCK_M, BLOCK_R] stays <= 32 KB); BLOCK_R is the
    padded rank; when the tiles alone leave SMs idle (decode-like batches), the forward splits O to reach about 2
    programs per SM and the backward splits D to reach about 1 (its splits repeat the z = g B_e product).

    Register-resident tiles (``tile_class`` "unaligned": d_in or d_out not a multiple of 16, or "fp32") get smaller
    tiles: BLOCK_M <= 64, and BLOCK_K = BLOCK_N = BLOCK_MW = BLOCK_W = 32 for fp32 (BLOCK_K = BLOCK_N = 16 at
    BLOCK_R = 128; r = 32 gets BLOCK_M <= 32 from the joint fp32 budget). Then 4 warps, or 8 when the
    tiles exceed ``slot_tiles_fit`` / ``weight_tiles_fit`` at 4, or fewer rows when they exceed them at 8.
    Compiled for sm_80 and sm_90 (benchmarks/triton_aot.py), none of the configs this returns spills.
    """
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank={rank} is outside 1..{MAX_RANK}")
    block_r = rank_block(rank)
    tiles = tile_class(d_in, d_out, element_size)
    rows_per_expert = num_slots / max(1, num_experts)
    if rows_per_expert <= 16:
        block_m = 16
    elif rows_per_expert <= 32:
        block_m = 32
    elif rows_per_expert >= 512 and block_r <= 64 and tiles == "tensor_core":
        block_m = 128
    else:
        block_m = 64
    # Keep the per-thread register tiles within the limits (slot_tiles_fit): more warps first, then fewer rows.
    block_k = block_n = 64 if block_r <= 64 and element_size < 4 else 32
    if element_size >= 4 and block_r >= 128:
        block_k = block_n = 16  # the fp32 [BLOCK_R, BLOCK_N] weight tile: 32 wide spilled in the atomic forward
    block_mw = 64 if rows_per_expert >= 64 and element_size < 4 else 32
    block_w = 64 if element_size < 4 else 32
    num_warps = 4
    while not (
        slot_tiles_fit(block_m, block_r, block_k, block_n, num_warps, tiles)
        and weight_tiles_fit(block_mw, block_w, block_r, num_warps, tiles)
    ):
        if num_warps < 8:
            num_warps = 8
        elif block_m > 16:
            block_m //= 2
        else:
            raise AssertionError(f"no tile fits r={rank}, element_size={element_size}")  # unreachable for r<=128
    split_fwd = split_bwd = 1
    if num_sms is not None:
        tiles = max(1, cdiv(num_slots, block_m))
        if tiles < num_sms:  # each forward split re-reads the tile's x rows (D wide): only to fill idle SMs
            split_fwd = max(1, min(cdiv(2 * num_sms, tiles), cdiv(d_out, block_n)))
        if tiles < num_sms // 2:  # each backward split re-reads g rows (O wide) to recompute z: split less
            split_bwd = max(1, min(cdiv(num_sms, tiles), cdiv(d_in, block_k)))
    return TileConfig(
        block_m=block_m,
        block_k=block_k,
        block_n=block_n,
        block_r=block_r,
        block_mw=block_mw,
        block_w=block_w,
        split_fwd=split_fwd,
        split_bwd=split_bwd,
        num_warps=num_warps,
        num_stages=3 if num_sms is not None else 1,
    )


def tile_class(d_in: int, d_out: int, element_size: int) -> str:
    """How much register room the kernels' tiles take, by what the compiler can do with them:

    "tensor_core"  16-bit inputs, d_in and d_out multiples of 16: vectorized cp.async loads through shared memory,
                   tensor-core dots;
    "unaligned"    16-bit inputs, d_in or d_out not a multiple of 16: no divisibility hint, so rows are loaded
                   element by element (an address and a predicate per element in registers, no cp.async pipeline);
    "fp32"         fp32 inputs: input_precision="ieee" dots run on the FMA units, both operands in registers.
    """
    if element_size >= 4:
        return "fp32"
    return "tensor_core" if d_in % 16 == 0 and d_out % 16 == 0 else "unaligned"


# Register budget, in elements per thread (32 * num_warps threads), of the kernels' two largest register tiles,
# per tile_class(...). Fitted to the kernels compiled for sm_80 and sm_90 by benchmarks/triton_aot.py:
# within these no config spills (16-bit tiles reach ~200 registers at the limits; at twice the resident limits
# fp32 spilled 8 B on sm_80 and an unaligned bf16 forward reached 168 registers at r <= 16).
#   slot kernels:  the streamed operand [BLOCK_M, max(BLOCK_K, BLOCK_N)] and the fp32 accumulator [BLOCK_M, BLOCK_R]
#   weight kernel: the streamed operand [BLOCK_MW, BLOCK_W] and the fp32 accumulator [BLOCK_R, BLOCK_W]
SLOT_TILE_LIMITS = {"tensor_core": (64, 32), "unaligned": (8, 16), "fp32": (8, 8)}
WEIGHT_TILE_LIMITS = {"tensor_core": (32, 64), "unaligned": (16, 32), "fp32": (8, 16)}
# fp32 slot kernels also bound the two tiles together: both at their limit (8 + 8, e.g. BLOCK_M 64, BLOCK_R 32,
# 8 warps) spilled 8 B in the sm_80 backward at an odd d; 12 keeps M64 R16 and M32 R64 (8 + 4, 4 + 8) at 8 warps.
SLOT_TILE_TOTAL_LIMITS = {"fp32": 12}


def slot_tiles_fit(block_m: int, block_r: int, block_k: int, block_n: int, num_warps: int, tiles: str) -> bool:
    """Whether the forward / backward-slot kernels' register tiles stay within SLOT_TILE_LIMITS (and together within
    SLOT_TILE_TOTAL_LIMITS)."""
    operand, accumulator = SLOT_TILE_LIMITS[tiles]
    threads = 32 * num_warps
    operand_elements, accumulator_elements = block_m * max(block_k, block_n), block_m * block_r
    total = SLOT_TILE_TOTAL_LIMITS.get(tiles, operand + accumulator)
    return (
        operand_elements <= operand * threads
        and accumulator_elements <= accumulator * threads
        and operand_elements + accumulator_elements <= total * threads
    )


def weight_tiles_fit(block_mw: int, block_w: int, block_r: int, num_warps: int, tiles: str) -> bool:
    """Whether the weight-gradient kernel's register tiles stay within WEIGHT_TILE_LIMITS."""
    operand, accumulator = WEIGHT_TILE_LIMITS[tiles]
    threads = 32 * num_warps
    return block_mw * block_w <= operand * threads and block_r * block_w <= accumulator * threads


def autotune_space_slots(block_r: int, block_m: int = 64, tiles: str = "tensor_core") -> list[dict[str, int]]:
    """Candidate (BLOCK_K, BLOCK_N, num_warps, num_stages) for the forward and backward-slot kernels (CUDA only):
    the entries whose tiles fit (``slot_tiles_fit``) at this BLOCK_M and BLOCK_R.

    BLOCK_M is not tuned: it sizes the tile map built before the launch.
    """
    space = []
    for block_k, block_n in ((32, 32), (64, 64), (64, 128), (128, 64)):
        if block_r >= 128 and max(block_k, block_n) > 64:  # the [BLOCK_R, BLOCK_N] weight tile, too
            continue
        for num_warps, num_stages in ((4, 2), (4, 3), (8, 3)):
            if slot_tiles_fit(block_m, block_r, block_k, block_n, num_warps, tiles):
                space.append(
                    {"BLOCK_K": block_k, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
                )
    return space


def autotune_space_weights(block_r: int, tiles: str = "tensor_core") -> list[dict[str, int]]:
    """Candidate (BLOCK_MW, BLOCK_W, num_warps, num_stages) for the weight-gradient kernel (CUDA only): the entries
    whose tiles fit (``weight_tiles_fit``) at this BLOCK_R."""
    space = []
    for block_mw, block_w in ((32, 32), (32, 64), (64, 64), (64, 128), (128, 64)):
        if block_r >= 128 and block_w > 64:
            continue
        for num_warps, num_stages in ((4, 2), (4, 3), (8, 3)):
            if weight_tiles_fit(block_mw, block_w, block_r, num_warps, tiles):
                space.append(
                    {"BLOCK_MW": block_mw, "BLOCK_W": block_w, "num_warps": num_warps, "num_stages": num_stages}
                )
    return space
