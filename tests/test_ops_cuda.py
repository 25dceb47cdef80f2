"""DCNv3 and DCNv4 CUDA kernels: golden files, gradcheck, CUDA against CPU for every dtype,
opcheck.

Skipped as a whole when CUDA is unavailable; the CPU parity tests live elsewhere and always run.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from op_cases import (
    CASES,
    DCNV4_CASES,
    DTYPES,
    TOLERANCES,
    Case,
    assert_close_scaled,
    golden_args,
    make_dcnv4_inputs,
    make_inputs,
)

from internimage.ops import dcnv3, dcnv4, extension_available, extension_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
GOLDEN_FLASH_DIR = GOLDEN_DIR.parent / "golden-flash"


def run_op(x, offset, mask, grad, params):
    out = torch.ops.internimage.dcnv3.default(x, offset, mask, *params)
    grads = torch.ops.internimage._dcnv3_backward.default(grad, x, offset, mask, *params)
    return (out, *grads)


def test_cuda_kernels_registered():
    assert extension_available(), f"internimage._C did not load: {extension_error()}"
    for op in ("internimage::dcnv3", "internimage::_dcnv3_backward", "internimage::dcnv4",
               "internimage::_dcnv4_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), (
            f"{op} has no CUDA kernel: rebuild with FORCE_CUDA=1 "
            "pip install --no-build-isolation -e ."
        )


@pytest.mark.parametrize(
    "path", sorted(GOLDEN_DIR.glob("op_*.pt")), ids=lambda p: p.stem
)
def test_golden_float64(path):
    d = torch.load(path, weights_only=True)
    params = golden_args(d["hparams"])
    x, offset, mask, grad = (d[k].cuda() for k in ("input", "offset", "mask", "grad_output"))
    results = run_op(x, offset, mask, grad, params)
    for name, actual in zip(("output", "grad_input", "grad_offset", "grad_mask"), results,
                            strict=True):
        assert actual.device.type == "cuda"
        torch.testing.assert_close(actual.cpu(), d[name], rtol=1e-10, atol=1e-10, msg=name)

    # The same through the public function and autograd.
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, *params)
    out.backward(grad)
    torch.testing.assert_close(out.detach().cpu(), d["output"], rtol=1e-10, atol=1e-10)
    for leaf, name in zip(leaves, ("grad_input", "grad_offset", "grad_mask"), strict=True):
        torch.testing.assert_close(leaf.grad.cpu(), d[name], rtol=1e-10, atol=1e-10, msg=name)


def test_golden_files_present():
    assert len(list(GOLDEN_DIR.glob("op_*.pt"))) >= 7, f"op golden files missing in {GOLDEN_DIR}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_cuda_matches_cpu(name, dtype):
    case = CASES[name]
    cpu_inputs = make_inputs(case, dtype, seed=zlib.crc32(name.encode()))
    expected = run_op(*cpu_inputs, case.params())
    actual = run_op(*(t.cuda() for t in cpu_inputs), case.params())
    rtol, atol_rel = TOLERANCES[dtype]
    for label, a, e in zip(("output", "grad_input", "grad_offset", "grad_mask"), actual,
                           expected, strict=True):
        assert a.is_cuda and a.shape == e.shape
        assert_close_scaled(a, e, rtol, atol_rel, f"{name}/{dtype}/{label}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_misaligned_and_noncontiguous_inputs(dtype):
    """A storage offset defeats the 16-byte vector path; results must not change."""
    case = CASES["gc16"]
    x, offset, mask, grad = (t.cuda() for t in make_inputs(case, dtype, seed=5))
    expected = run_op(x, offset, mask, grad, case.params())

    def misaligned(t):
        buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
        return buffer.view(t.shape).copy_(t)

    shifted = run_op(misaligned(x), offset, mask, misaligned(grad), case.params())
    # A channels-first tensor viewed as channels-last is not contiguous.
    strided_x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    strided = run_op(strided_x, offset, mask, grad, case.params())
    rtol, atol_rel = TOLERANCES[dtype]
    for results in (shifted, strided):
        for label, a, e in zip(("output", "grad_input", "grad_offset", "grad_mask"), results,
                               expected, strict=True):
            assert_close_scaled(a, e.cpu(), rtol, atol_rel, label)


@pytest.mark.parametrize(
    "case",
    [
        Case(1, 4, 5, 2, 3),
        Case(1, 5, 4, 2, 4, stride=(2, 1), offset_scale=0.5, remove_center=True),
        Case(2, 3, 3, 1, 17, kernel=(3, 1), pad=(1, 0)),
    ],
    ids=("gc3", "gc4_rc_stride", "gc17_k3x1"),
)
def test_gradcheck_float64(case):
    x, offset, mask, _ = make_inputs(case, torch.float64, seed=11)
    leaves = tuple(t.cuda().requires_grad_() for t in (x, offset, mask))
    params = case.params()
    assert torch.autograd.gradcheck(
        lambda *t: dcnv3(*t, *params), leaves, eps=1e-6, atol=1e-6, nondet_tol=1e-12
    )


def test_opcheck():
    case = CASES["gc16"]
    x, offset, mask, grad = (t.cuda() for t in make_inputs(case, torch.float64, seed=3))
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    torch.library.opcheck(torch.ops.internimage.dcnv3.default, (*leaves, *case.params()))
    torch.library.opcheck(
        torch.ops.internimage._dcnv3_backward.default,
        (grad, x.detach(), offset.detach(), mask.detach(), *case.params()),
    )
    fp32 = [t.detach().float() for t in (x, offset, mask)]
    torch.library.opcheck(
        torch.ops.internimage.dcnv3.default, (*fp32, *case.params()),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_empty_batch():
    case = Case(0, 5, 6, 2, 16)
    x, offset, mask, grad = (t.cuda() for t in make_inputs(case, torch.float32))
    out, grad_x, grad_offset, grad_mask = run_op(x, offset, mask, grad, case.params())
    assert out.shape == (0, 5, 6, 32) and out.is_cuda
    assert grad_x.shape == x.shape and grad_offset.shape == offset.shape
    assert grad_mask.shape == mask.shape


def test_autocast_bfloat16():
    case = CASES["gc16"]
    x, offset, mask, _ = (t.cuda() for t in make_inputs(case, torch.float32, seed=2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dcnv3(x, offset, mask, *case.params())
    assert out.dtype == torch.bfloat16
    expected = dcnv3(*(t.bfloat16() for t in (x, offset, mask)), *case.params())
    torch.testing.assert_close(out, expected)


def test_side_stream():
    case = CASES["gc16"]
    inputs = tuple(t.cuda() for t in make_inputs(case, torch.float32, seed=4))
    expected = run_op(*inputs, case.params())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual = run_op(*inputs, case.params())
    stream.synchronize()
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    case = CASES["gc16"]
    cpu_inputs = make_inputs(case, torch.float32, seed=6)
    expected = run_op(*cpu_inputs, case.params())
    with torch.cuda.device(0):
        actual = run_op(*(t.to("cuda:1") for t in cpu_inputs), case.params())
    for a, e in zip(actual, expected, strict=True):
        assert a.device == torch.device("cuda:1")
        assert_close_scaled(a, e, 1e-4, 1e-5, "cuda:1")


def test_offset_and_mask_gradients_are_deterministic():
    case = CASES["gc1025"]
    inputs = tuple(t.cuda() for t in make_inputs(case, torch.float32, seed=7))
    first = run_op(*inputs, case.params())
    second = run_op(*inputs, case.params())
    assert torch.equal(first[0], second[0])  # forward
    assert torch.equal(first[2], second[2])  # grad_offset
    assert torch.equal(first[3], second[3])  # grad_mask
    torch.testing.assert_close(first[1], second[1])  # grad_input: atomics, any order


def test_deterministic_mode_alerts_on_backward():
    case = CASES["gc16"]
    x, offset, mask, grad = (t.cuda() for t in make_inputs(case, torch.float32))
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.ops.internimage.dcnv3.default(x, offset, mask, *case.params())  # forward is fine
        with pytest.raises(RuntimeError, match="dcnv3_backward_cuda"):
            torch.ops.internimage._dcnv3_backward.default(grad, x, offset, mask, *case.params())
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="dcnv3_backward_cuda"):
            torch.ops.internimage._dcnv3_backward.default(grad, x, offset, mask, *case.params())
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def test_errors_name_the_argument():
    case = CASES["gc16"]
    x, offset, mask, grad = (t.cuda() for t in make_inputs(case, torch.float32))
    with pytest.raises(RuntimeError, match="offset must be on the input's device"):
        torch.ops.internimage.dcnv3.default(x, offset.cpu(), mask, *case.params())
    with pytest.raises(RuntimeError, match="mask must have the input's dtype"):
        torch.ops.internimage.dcnv3.default(x, offset, mask.double(), *case.params())
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.internimage._dcnv3_backward.default(
            grad[:, :-1], x, offset, mask, *case.params()
        )


def test_int64_indexing():
    """offset has more than 2**31 elements: the 64-bit index path must match the 32-bit one."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    # 8 groups of 2 channels, 3x3: 144 offsets per pixel; 3700 * 64 * 64 pixels.
    case = Case(3700, 64, 64, 8, 2)
    dtype, device = torch.bfloat16, torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    shape = (case.n, case.height, case.width)
    x = torch.randn(*shape, 16, generator=gen, device=device, dtype=dtype)
    offset = torch.randn(*shape, 144, generator=gen, device=device, dtype=dtype)
    assert offset.numel() > 2**31
    mask = torch.rand(*shape, 72, generator=gen, device=device, dtype=dtype)
    grad = torch.randn(*shape, 16, generator=gen, device=device, dtype=dtype)
    params = case.params()
    big = run_op(x, offset, mask, grad, params)
    for n in (0, case.n // 2, case.n - 1):
        small = run_op(x[n : n + 1], offset[n : n + 1], mask[n : n + 1], grad[n : n + 1], params)
        for label, b, s in zip(("output", "grad_input", "grad_offset", "grad_mask"), big, small,
                               strict=True):
            torch.testing.assert_close(b[n : n + 1], s, msg=f"batch {n} {label}")


# ---------------------------------------------------------------------------------------------
# DCNv4: the same kernels reading the packed offset_mask


def run_op4(x, offset_mask, grad, params):
    out = torch.ops.internimage.dcnv4.default(x, offset_mask, *params)
    grads = torch.ops.internimage._dcnv4_backward.default(grad, x, offset_mask, *params)
    return (out, *grads)


def test_dcnv4_golden_float64():
    paths = sorted(GOLDEN_FLASH_DIR.glob("op_*.pt"))
    assert paths, f"op golden files missing in {GOLDEN_FLASH_DIR}"
    for path in paths:
        d = torch.load(path, weights_only=True)
        h = d["hparams"]
        params = golden_args(h)
        x, offset_mask, grad = (d[k].cuda() for k in ("input", "offset_mask", "grad_output"))
        results = run_op4(x, offset_mask, grad, params)
        for name, actual in zip(("output", "grad_input", "grad_offset_mask"), results,
                                strict=True):
            assert actual.device.type == "cuda"
            torch.testing.assert_close(actual.cpu(), d[name], rtol=1e-10, atol=1e-10, msg=name)
        assert (results[2][..., h["offset_mask_used_channels"]:] == 0).all()
        leaves = [t.clone().requires_grad_() for t in (x, offset_mask)]
        out = dcnv4(*leaves, *params)
        out.backward(grad)
        torch.testing.assert_close(out.detach().cpu(), d["output"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(leaves[1].grad.cpu(), d["grad_offset_mask"], rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("n", (1, 3, 64))
@pytest.mark.parametrize("group_channels", (8, 16, 32, 64))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dcnv4_cuda_matches_cpu(dtype, group_channels, n):
    case = Case(n, 5, 6, 2, group_channels)
    cpu_inputs = make_dcnv4_inputs(case, dtype, seed=group_channels + n)
    expected = run_op4(*cpu_inputs, case.params())
    actual = run_op4(*(t.cuda() for t in cpu_inputs), case.params())
    rtol, atol_rel = TOLERANCES[dtype]
    for label, a, e in zip(("output", "grad_input", "grad_offset_mask"), actual, expected,
                           strict=True):
        assert a.is_cuda and a.shape == e.shape
        assert_close_scaled(a, e, rtol, atol_rel, f"{dtype}/gc{group_channels}/n{n}/{label}")
    assert (actual[2][..., 3 * case.group * case.points:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", DCNV4_CASES)
def test_dcnv4_cuda_matches_cpu_other_shapes(name, dtype):
    case = DCNV4_CASES[name]
    cpu_inputs = make_dcnv4_inputs(case, dtype, extra=3, seed=zlib.crc32(name.encode()))
    expected = run_op4(*cpu_inputs, case.params())
    actual = run_op4(*(t.cuda() for t in cpu_inputs), case.params())
    rtol, atol_rel = TOLERANCES[dtype]
    for label, a, e in zip(("output", "grad_input", "grad_offset_mask"), actual, expected,
                           strict=True):
        assert_close_scaled(a, e, rtol, atol_rel, f"{name}/{dtype}/{label}")


def test_dcnv4_runs_dcnv3s_kernels_on_the_split_tensors():
    case = CASES["gc16"]
    x, offset_mask, grad = (t.cuda() for t in make_dcnv4_inputs(case, torch.float32, seed=8))
    per_group = offset_mask[..., : 3 * case.group * case.points].unflatten(
        -1, (case.group, 3 * case.points))
    offset = per_group[..., : 2 * case.points].flatten(-2).contiguous()
    mask = per_group[..., 2 * case.points:].flatten(-2).contiguous()
    v4 = run_op4(x, offset_mask, grad, case.params())
    v3 = run_op(x, offset, mask, grad, case.params())
    assert torch.equal(v4[0], v3[0])  # forward: same kernel, same numbers
    torch.testing.assert_close(v4[1], v3[1])  # grad_input: atomics, any order
    grad_per_group = v4[2][..., : 3 * case.group * case.points].unflatten(
        -1, (case.group, 3 * case.points))
    assert torch.equal(grad_per_group[..., : 2 * case.points].flatten(-2), v3[2])
    assert torch.equal(grad_per_group[..., 2 * case.points:].flatten(-2), v3[3])


def test_dcnv4_gradcheck_and_opcheck():
    case = Case(1, 4, 5, 2, 3, stride=(2, 1), remove_center=True)
    x, offset_mask, grad = (t.cuda() for t in make_dcnv4_inputs(case, torch.float64, seed=12))
    params = case.params()
    leaves = tuple(t.clone().requires_grad_() for t in (x, offset_mask))
    assert torch.autograd.gradcheck(
        lambda *t: dcnv4(*t, *params), leaves, eps=1e-6, atol=1e-6, nondet_tol=1e-12
    )
    torch.library.opcheck(torch.ops.internimage.dcnv4.default, (*leaves, *params))
    torch.library.opcheck(torch.ops.internimage._dcnv4_backward.default,
                          (grad, x, offset_mask, *params))


@pytest.mark.parametrize("inputs_dtype", (torch.float32, torch.float16), ids=str)
def test_dcnv4_autocast_bfloat16(inputs_dtype):
    case = CASES["gc16"]
    x, offset_mask, _ = (t.cuda().to(inputs_dtype)
                         for t in make_dcnv4_inputs(case, torch.float32, seed=2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dcnv4(x, offset_mask, *case.params())
    assert out.dtype == torch.bfloat16
    expected = dcnv4(x.bfloat16(), offset_mask.bfloat16(), *case.params())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dcnv4_deterministic_mode_alerts_on_backward_and_errors_name_arguments():
    case = CASES["gc16"]
    x, offset_mask, grad = (t.cuda() for t in make_dcnv4_inputs(case, torch.float32))
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.ops.internimage.dcnv4.default(x, offset_mask, *case.params())
        with pytest.raises(RuntimeError, match="dcnv4_backward_cuda"):
            torch.ops.internimage._dcnv4_backward.default(grad, x, offset_mask, *case.params())
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
    with pytest.raises(RuntimeError, match="dcnv4: offset_mask must be on the input's device"):
        torch.ops.internimage.dcnv4.default(x, offset_mask.cpu(), *case.params())
    with pytest.raises(RuntimeError, match=r"dcnv4: offset_mask must have shape .* C >= "):
        torch.ops.internimage.dcnv4.default(x, offset_mask[..., :10], *case.params())
