"""The DCNv3 operator on CPU: golden parity, gradients, registration, edge cases, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import golden_files
from op_cases import golden_args

import internimage
from internimage.ops import dcnv3, dcnv3_reference

if not internimage.ops.extension_available():  # fail loudly: these tests are the kernels' proof
    raise RuntimeError(
        f"internimage._C is not built ({internimage.ops.extension_error()}); "
        "run: pip install --no-build-isolation -e ."
    )

OP = torch.ops.internimage.dcnv3.default
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_with_grads(fn, inputs, grad_output, args):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    output = fn(*leaves, *args)
    output.backward(grad_output)
    return output.detach(), *(t.grad for t in leaves)


def random_case(
    n=2,
    h=6,
    w=7,
    group=2,
    gc=4,
    kernel=(3, 3),
    stride=(1, 1),
    pad=(1, 1),
    dil=(1, 1),
    remove_center=False,
    offset_std=2.0,
    dtype=torch.float64,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    points = kernel[0] * kernel[1] - int(remove_center)
    out_h = (h + 2 * pad[0] - (dil[0] * (kernel[0] - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * pad[1] - (dil[1] * (kernel[1] - 1) + 1)) // stride[1] + 1
    x = torch.randn(n, h, w, group * gc, generator=gen, dtype=dtype)
    offset = torch.randn(n, out_h, out_w, group * points * 2, generator=gen, dtype=dtype)
    offset = offset * offset_std
    mask = torch.softmax(
        torch.randn(n, out_h, out_w, group, points, generator=gen, dtype=dtype), -1
    ).flatten(-2)
    args = (kernel, stride, pad, dil, group, gc, 1.0, remove_center)
    return (x, offset, mask), args


# ---------------------------------------------------------------------------------------------
# Golden parity with the original code (../shared/golden/op_*.pt)

GOLDEN_OPS = golden_files("op_*.pt")


@pytest.mark.parametrize("path", GOLDEN_OPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("fn", [dcnv3, dcnv3_reference], ids=["compiled", "reference"])
def test_golden_float64(path, fn):
    d = torch.load(path, weights_only=True)
    results = run_with_grads(
        fn, (d["input"], d["offset"], d["mask"]), d["grad_output"], golden_args(d["hparams"])
    )
    for name, got in zip(("output", "grad_input", "grad_offset", "grad_mask"), results):
        torch.testing.assert_close(got, d[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("path", GOLDEN_OPS, ids=lambda p: p.stem)
def test_golden_float32(path):
    d = torch.load(path, weights_only=True)
    inputs = tuple(d[k].float() for k in ("input", "offset", "mask"))
    results = run_with_grads(dcnv3, inputs, d["grad_output"].float(), golden_args(d["hparams"]))
    # Output to the golden README's 1e-5; gradients sum over up to 25 taps x 16 channels of
    # O(1) terms, so they get a few float32 ulps more.
    tolerances = {"output": 1e-5, "grad_input": 2e-5, "grad_offset": 5e-5, "grad_mask": 5e-5}
    for name, got in zip(tolerances, results):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), d[name], rtol=0, atol=tolerances[name], msg=name)


# ---------------------------------------------------------------------------------------------
# Gradients and registration


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(kernel=(1, 3), pad=(0, 1), group=3, gc=2),
        dict(kernel=(3, 2), stride=(2, 1), pad=(2, 0), dil=(1, 2), remove_center=True),
        dict(h=1, w=1, kernel=(3, 3), offset_std=0.7),
    ],
)
def test_gradcheck_float64(case):
    # offset_std 2 on a 6x7 map sends many samples outside the image or across its border.
    inputs, args = random_case(n=1, **case)
    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: dcnv3(*t, *args), leaves, eps=1e-6, atol=1e-7)


def test_opcheck():
    for case in (dict(), dict(kernel=(3, 2), stride=(2, 1), pad=(0, 1), remove_center=True)):
        inputs, args = random_case(**case)
        kernel, stride, pad, dil, group, gc, scale, rc = args
        sample = (*inputs, list(kernel), list(stride), list(pad), list(dil), group, gc, scale, rc)
        torch.library.opcheck(OP, sample)
        leaves = tuple(t.clone().requires_grad_() for t in inputs)
        torch.library.opcheck(OP, (*leaves, *sample[3:]))


def test_compile_fullgraph_matches_eager():
    inputs, args = random_case(dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]

    def f(x, offset, mask):
        return dcnv3(x * 2.0, offset, mask, *args).relu()

    explanation = torch._dynamo.explain(f)(*inputs)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = compiled(*leaves)
    out.sum().backward()
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    expected = f(*eager_leaves)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(leaves, eager_leaves):
        torch.testing.assert_close(got.grad, want.grad)


def test_double_backward_is_refused():
    inputs, args = random_case()
    leaves = [t.requires_grad_() for t in inputs]
    out = dcnv3(*leaves, *args)
    (grad_x,) = torch.autograd.grad(out.sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


# ---------------------------------------------------------------------------------------------
# Compiled kernels against the reference on many shapes

EDGE_CASES = {
    "1x1_map": dict(h=1, w=1),
    "kernel_larger_than_map": dict(h=2, w=3, kernel=(5, 5), pad=(2, 2)),
    "stride_larger_than_map": dict(h=3, w=2, stride=(4, 5), pad=(1, 1)),
    "asymmetric_padding": dict(kernel=(3, 5), pad=(0, 2)),
    "asymmetric_everything": dict(kernel=(2, 3), stride=(2, 1), pad=(1, 0), dil=(2, 1)),
    "remove_center_even_kernel": dict(kernel=(2, 4), pad=(1, 1), remove_center=True),
    "one_channel_groups": dict(group=5, gc=1),
    "wide_groups": dict(group=1, gc=71),
    "gc16": dict(group=3, gc=16),
    "gc32": dict(group=2, gc=32),
}


def assert_matches_reference(inputs, args, atol=1e-10):
    grad = torch.randn(dcnv3_reference(*inputs, *args).shape, dtype=inputs[0].dtype)
    got = run_with_grads(dcnv3, inputs, grad, args)
    want = run_with_grads(dcnv3_reference, inputs, grad, args)
    for name, a, b in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("case", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_edge_cases_match_reference(case):
    inputs, args = random_case(**case)
    assert_matches_reference(inputs, args)


def test_random_shapes_match_reference():
    gen = torch.Generator().manual_seed(1234)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    for seed in range(40):
        kernel = (draw(1, 5), draw(1, 5))
        dil = (draw(1, 3), draw(1, 3))
        pad = (draw(0, 3), draw(0, 3))
        h = max(draw(1, 9), dil[0] * (kernel[0] - 1) + 1 - 2 * pad[0])
        w = max(draw(1, 9), dil[1] * (kernel[1] - 1) + 1 - 2 * pad[1])
        case = dict(
            n=draw(1, 3),
            h=h,
            w=w,
            group=draw(1, 4),
            gc=draw(1, 9),
            kernel=kernel,
            stride=(draw(1, 3), draw(1, 3)),
            pad=pad,
            dil=dil,
            remove_center=kernel[0] * kernel[1] > 1 and draw(0, 1) == 1,
            # Non-zero offsets: at exactly integer locations bilinear sampling has a kink, where
            # the reference's gradient depends on grid_sample's coordinate rounding.
            offset_std=0.5 * draw(1, 6),
            seed=seed,
        )
        inputs, args = random_case(**case)
        assert_matches_reference(inputs, args)


def test_non_contiguous_and_channels_last_strided_inputs():
    (x, offset, mask), args = random_case(n=2, h=5, w=6, group=2, gc=4)
    expected = dcnv3_reference(x, offset, mask, *args)
    # An NCHW tensor in channels_last memory, permuted to NHWC, is contiguous; permuting a
    # contiguous NCHW tensor gives the strided NHWC view a model hands to the op.
    x_strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    offset_padded = torch.cat([offset, torch.zeros_like(offset)], dim=-1)[..., : offset.shape[-1]]
    mask_transposed = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_strided.is_contiguous() and not offset_padded.is_contiguous()
    assert not mask_transposed.is_contiguous()
    got = dcnv3(x_strided, offset_padded, mask_transposed, *args)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_huge_and_non_finite_offsets():
    (x, offset, mask), args = random_case(n=1, h=5, w=5, group=2, gc=3)
    offset = offset.clone()
    offset[..., 0] = 1e30  # far outside: skipped, no out-of-bounds read
    offset[..., 2] = float("inf")
    offset[..., 3] = float("-inf")
    offset[..., 4] = float("nan")
    offset[..., 7] = -3e9  # beyond int32 after scaling
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, *args)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    # Documented semantics: a sample with a non-finite or far-away location contributes zero
    # and gets zero gradients, exactly like one placed anywhere outside the image.
    points = 9
    pair = offset.view(1, 5, 5, 2, points, 2)
    skipped = ~torch.isfinite(pair).all(-1) | (pair.abs() > 1e6).any(-1)
    replaced = torch.where(skipped.unsqueeze(-1), torch.full_like(pair, 100.0), pair)
    expected = dcnv3_reference(x, replaced.view_as(offset), mask, *args)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-12)
    grad_mask = leaves[2].grad.view(1, 5, 5, 2, points)
    assert (grad_mask[skipped] == 0).all()
    assert (leaves[1].grad.view_as(pair)[skipped] == 0).all()


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_reduced_precision_against_float32(dtype, atol):
    inputs, args = random_case(group=2, gc=16, dtype=torch.float32)
    grad = torch.randn(2, 6, 7, 32)
    low = run_with_grads(dcnv3, [t.to(dtype) for t in inputs], grad.to(dtype), args)
    rounded = [t.to(dtype).float() for t in inputs]
    high = run_with_grads(dcnv3, rounded, grad.to(dtype).float(), args)
    for name, a, b in zip(("output", "grad_input", "grad_offset", "grad_mask"), low, high):
        assert a.dtype == dtype, name
        scale = b.abs().max().clamp_min(1)
        torch.testing.assert_close(a.float() / scale, b / scale, rtol=0, atol=atol, msg=name)


def test_autocast_runs_in_autocast_dtype():
    inputs, args = random_case(group=2, gc=16, dtype=torch.float32)
    x, offset, mask = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcnv3(x.to(torch.bfloat16), offset, mask, *args)  # mixed dtypes are cast
    assert out.dtype == torch.bfloat16
    expected = dcnv3(*(t.to(torch.bfloat16) for t in inputs), *args)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    double = [t.double() for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dcnv3(*double, *args).dtype == torch.float64  # float64 is left alone


def test_zero_size_batch():
    (x, offset, mask), args = random_case(n=0)
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, *args)
    assert out.shape == (0, 6, 7, 8)
    out.sum().backward()
    assert leaves[0].grad.shape == x.shape


def test_backward_is_deterministic_across_runs_and_threads():
    inputs, args = random_case(n=2, h=12, w=12, group=4, gc=16, dtype=torch.float32)
    grad = torch.randn(2, 12, 12, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 3, 1):
            torch.set_num_threads(n_threads)
            results.append(run_with_grads(dcnv3, inputs, grad, args))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the argument, the expected and the actual value


def bad_call(**overrides):
    (x, offset, mask), args = random_case(n=1, h=4, w=5, group=2, gc=3)
    kernel, stride, pad, dil, group, gc, scale, rc = args
    call = dict(
        input=x,
        offset=offset,
        mask=mask,
        kernel_size=kernel,
        stride=stride,
        padding=pad,
        dilation=dil,
        group=group,
        group_channels=gc,
        offset_scale=scale,
        remove_center=rc,
    )
    call.update(overrides)
    return call


BAD_INPUTS = {
    "input rank": (lambda c: dict(input=c["input"][0]), ValueError, r"input must be 4-D.*3-D"),
    "channels": (
        lambda c: dict(group_channels=4),
        ValueError,
        r"input channels must equal group \* group_channels = 2 \* 4 = 8, got 6",
    ),
    "offset last dim": (
        lambda c: dict(offset=c["offset"][..., :-1]),
        ValueError,
        r"offset must have shape \(1, 4, 5, 36\), got \(1, 4, 5, 35\)",
    ),
    "mask spatial": (
        lambda c: dict(mask=c["mask"][:, :3]),
        ValueError,
        r"mask must have shape \(1, 4, 5, 18\), got \(1, 3, 5, 18\)",
    ),
    "offset dtype": (
        lambda c: dict(offset=c["offset"].float()),
        TypeError,
        r"offset must have the input's dtype torch.float64, got torch.float32",
    ),
    "mask device": (
        lambda c: dict(mask=c["mask"].to("meta")),
        ValueError,
        r"mask must be on the input's device cpu, got meta",
    ),
    "integer input": (
        lambda c: dict(input=c["input"].long()),
        TypeError,
        r"input must be a floating-point",
    ),
    "zero kernel": (
        lambda c: dict(kernel_size=0),
        ValueError,
        r"kernel_size must be >= 1, got \(0, 0\)",
    ),
    "negative padding": (
        lambda c: dict(padding=(1, -1)),
        ValueError,
        r"padding must be >= 0, got \(1, -1\)",
    ),
    "zero stride": (lambda c: dict(stride=(0, 1)), ValueError, r"stride must be >= 1"),
    "zero dilation": (lambda c: dict(dilation=0), ValueError, r"dilation must be >= 1"),
    "zero group": (lambda c: dict(group=0), ValueError, r"group must be >= 1, got 0"),
    "float group": (lambda c: dict(group=2.0), TypeError, r"group must be an int, got 2.0"),
    "kernel triple": (
        lambda c: dict(kernel_size=(3, 3, 3)),
        TypeError,
        r"kernel_size must be an int or a pair",
    ),
    "no output": (
        lambda c: dict(kernel_size=9, padding=0),
        ValueError,
        r"output size must be >= 1, got \(-4, -3\)",
    ),
    "nan offset_scale": (
        lambda c: dict(offset_scale=float("nan")),
        ValueError,
        r"offset_scale must be a finite",
    ),
}


@pytest.mark.parametrize("fn", [dcnv3, dcnv3_reference], ids=["compiled", "reference"])
@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_named_error(fn, case):
    make_overrides, error, pattern = case
    call = bad_call()
    call.update(make_overrides(call))
    with pytest.raises(error, match=pattern):
        fn(**call)


def test_compiled_op_checks_its_arguments_too():
    (x, offset, mask), _ = random_case(n=1, h=4, w=5, group=2, gc=3)
    with pytest.raises(RuntimeError, match=r"dcnv3: offset must have shape \(1, 4, 5, 36\)"):
        OP(x, offset[..., :-2], mask, [3, 3], [1, 1], [1, 1], [1, 1], 2, 3, 1.0, False)
    with pytest.raises(RuntimeError, match=r"group \* group_channels = 2 \* 4 = 8, got 6"):
        OP(x, offset, mask, [3, 3], [1, 1], [1, 1], [1, 1], 2, 4, 1.0, False)


# ---------------------------------------------------------------------------------------------
# Without the compiled extension


def test_import_without_extension_falls_back_with_one_warning():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["internimage._C"] = None  # makes `from internimage import _C` fail
        import torch, internimage
        assert not internimage.ops.extension_available()
        x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
        offset = torch.randn(1, 4, 4, 36, dtype=torch.float64)
        mask = torch.softmax(torch.randn(1, 4, 4, 2, 9, dtype=torch.float64), -1).flatten(-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = internimage.ops.dcnv3(x, offset, mask, 3, 1, 1, 1, 2, 4, 1.0)
            b = internimage.ops.dcnv3(x, offset, mask, 3, 1, 1, 1, 2, 4, 1.0)
        messages = [str(w.message) for w in caught if "falls back" in str(w.message)]
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation -e ." in messages[0]
        ref = internimage.ops.dcnv3_reference(x, offset, mask, 3, 1, 1, 1, 2, 4, 1.0)
        assert torch.equal(a, ref) and torch.equal(b, ref)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
