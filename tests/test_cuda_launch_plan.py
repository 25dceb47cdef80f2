"""The CUDA kernels' launch plan (csrc/launch_plan.h, through internimage::_cuda_launch_plan) at
every registered variant's stage shapes, batch 1 to 512, images 224² to 1536², SM counts 1 to 160:
within CUDA's launch limits, never an empty grid, int32 indices only when every index the
kernels form fits, whole warps. Runs on the CPU; no GPU needed."""

from __future__ import annotations

import itertools

import timm
import torch

import internimage.flash_internimage as flash_module
import internimage.internimage as internimage_module

PLAN = torch.ops.internimage._cuda_launch_plan.default
INT32_MAX = 2**31 - 1
THREADS = 256  # per block (kThreads)
MAX_BLOCKS_PER_SM = 32
BATCHES = (1, 2, 7, 64, 256, 512)
IMAGES = (224, 384, 640, 1024, 1536)
SM_COUNTS = (1, 40, 58, 108, 132, 160)  # one SM, T4, L4, A100, H100, a larger part
ELEMENT_BYTES = (8, 4, 2)  # float64, float32, float16 / bfloat16
POINTS = 9  # every variant's DCN is 3x3


def stage_layers() -> set[tuple[str, int, int, int, int]]:
    """(family, stage, group, group_channels, downsampling) of every registered variant's DCN
    layers, read from the variants the timm entry points build."""
    layers = set()
    for family, module in (("internimage", internimage_module),
                           ("flash_internimage", flash_module)):
        names = timm.list_models(f"{family}_*")
        assert names, f"no {family} models registered"
        for name in names:
            variant = name.removeprefix(f"{family}_")
            args = module._VARIANTS[variant]
            for stage, group in enumerate(args["groups"]):
                channels = args["channels"] * 2**stage
                layers.add((family, stage, group, channels // group, 4 * 2**stage))
    return layers


def test_every_variant_is_covered():
    families = {layer[0] for layer in stage_layers()}
    assert families == {"internimage", "flash_internimage"}
    assert {layer[3] for layer in stage_layers()} >= {16, 32}  # group_channels in use


def test_plan_at_every_variant_stage_batch_image_and_sm_count():
    checked = 0
    for (family, stage, group, gc, down), n, image, sms, item in itertools.product(
        sorted(stage_layers()), BATCHES, IMAGES, SM_COUNTS, ELEMENT_BYTES
    ):
        side = image // down  # stride-1 3x3 DCN: output map = input map
        pixels = n * side * side
        # The largest tensor the kernels index: input/output (N, H, W, C), DCNv3's offset
        # (N, H, W, 2GP) or DCNv4's packed offset_mask (3GP rounded up to a multiple of 8).
        om = 2 * group * POINTS if family == "internimage" else -(-3 * group * POINTS // 8) * 8
        largest = pixels * max(group * gc, om)
        wide = 16 // item
        for address in (4096, 4096 + item):  # 16-byte aligned, then one element off
            vec, lanes_log2, total, padded, blocks, use_int32 = PLAN(
                n, side, side, group, gc, item, address, largest, sms
            )
            label = f"{family} stage {stage} g{group}x{gc} n{n} {image}² {sms} SMs {item}B"
            lanes = 1 << lanes_log2
            vectors = gc // vec
            assert vec == (wide if gc % wide == 0 and address % 16 == 0 else 1), label
            assert lanes <= 32 and (lanes >= min(vectors, 32) and lanes // 2 < vectors), label
            assert total == pixels * group * lanes, label
            assert padded % 32 == 0 and 0 <= padded - total < 32, label
            assert 1 <= blocks <= min(sms * MAX_BLOCKS_PER_SM, INT32_MAX), label
            # Enough blocks for one thread per padded work item, up to the clamp.
            assert blocks * THREADS >= min(padded, sms * MAX_BLOCKS_PER_SM * THREADS), label
            if use_int32:
                # The last grid-stride index a thread forms before leaving the loop, and every
                # tensor index, fit in int32.
                assert padded - 1 + blocks * THREADS <= INT32_MAX, label
                assert largest <= INT32_MAX, label
            checked += 1
    assert checked > 10_000


def test_int32_at_common_sizes_and_int64_beyond():
    # T's first stage at 224², batch 64: far from 2^31.
    assert PLAN(64, 56, 56, 4, 16, 4, 4096, 64 * 56 * 56 * 72, 132)[5]
    # G's first stage at 1536², batch 512: its input alone has 3.9e10 elements.
    side, channels = 1536 // 4, 512
    assert not PLAN(512, side, side, 16, 32, 2, 4096, 512 * side * side * channels, 132)[5]


def test_empty_and_single_slot_launches_have_one_block():
    assert PLAN(1, 1, 1, 1, 1, 4, 4096, 9, 132)[4] == 1
    assert PLAN(0, 5, 5, 2, 16, 4, 4096, 0, 132)[4] == 1  # (the host does not launch these)
