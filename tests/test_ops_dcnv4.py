"""The DCNv4 operator on CPU: golden parity, the packed layout, gradients, registration,
autocast, edge cases and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_FLASH_DIR, golden_files
from op_cases import golden_args

import internimage
from internimage.ops import dcnv3, dcnv4, dcnv4_reference

if not internimage.ops.extension_available():  # fail loudly: these tests are the kernels' proof
    raise RuntimeError(
        f"internimage._C is not built ({internimage.ops.extension_error()}); "
        "run: pip install --no-build-isolation -e ."
    )

OP = torch.ops.internimage.dcnv4.default
BACKWARD_OP = torch.ops.internimage._dcnv4_backward.default


def out_size(size, kernel, stride, pad, dil):
    return (size + 2 * pad - (dil * (kernel - 1) + 1)) // stride + 1


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
    extra=5,
    offset_std=2.0,
    offset_scale=1.0,
    dtype=torch.float64,
    seed=0,
):
    """(input, offset_mask) and the op's other arguments; the padding channels (`extra` of
    them) hold large garbage, as a real offset_mask projection's do."""
    gen = torch.Generator().manual_seed(seed)
    points = kernel[0] * kernel[1] - int(remove_center)
    out_h = out_size(h, kernel[0], stride[0], pad[0], dil[0])
    out_w = out_size(w, kernel[1], stride[1], pad[1], dil[1])
    x = torch.randn(n, h, w, group * gc, generator=gen, dtype=dtype)
    offsets = offset_std * torch.randn(n, out_h, out_w, group, 2 * points, generator=gen,
                                       dtype=dtype)
    mask = torch.randn(n, out_h, out_w, group, points, generator=gen, dtype=dtype)  # raw
    padding = 100 * torch.randn(n, out_h, out_w, extra, generator=gen, dtype=dtype)
    offset_mask = torch.cat([torch.cat([offsets, mask], -1).flatten(-2), padding], -1)
    args = (kernel, stride, pad, dil, group, gc, offset_scale, remove_center)
    return (x, offset_mask), args


def split(offset_mask, group, points):
    """DCNv4's packed tensor as DCNv3's offset and mask (contiguous)."""
    per_group = offset_mask[..., : 3 * group * points].unflatten(-1, (group, 3 * points))
    offset = per_group[..., : 2 * points].flatten(-2).contiguous()
    mask = per_group[..., 2 * points :].flatten(-2).contiguous()
    return offset, mask


def points_of(args):
    kernel, *_, rc = args
    return kernel[0] * kernel[1] - int(rc)


def run_with_grads(fn, inputs, grad_output, args):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    output = fn(*leaves, *args)
    output.backward(grad_output)
    return output.detach(), *(t.grad for t in leaves)


# ---------------------------------------------------------------------------------------------
# Golden parity with the original DCNv4 code (../shared/golden-flash/op_*.pt)

GOLDEN_OPS = golden_files("op_*.pt", GOLDEN_FLASH_DIR)


@pytest.mark.parametrize("path", GOLDEN_OPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("fn", [dcnv4, dcnv4_reference], ids=["compiled", "reference"])
def test_golden_float64(path, fn):
    d = torch.load(path, weights_only=True)
    h = d["hparams"]
    assert d["offset_mask"].shape[-1] == h["offset_mask_channels"] > h["offset_mask_used_channels"]
    results = run_with_grads(
        fn, (d["input"], d["offset_mask"]), d["grad_output"], golden_args(h)
    )
    for name, got in zip(("output", "grad_input", "grad_offset_mask"), results, strict=True):
        torch.testing.assert_close(got, d[name], rtol=0, atol=1e-10, msg=name)
    assert (results[2][..., h["offset_mask_used_channels"]:] == 0).all()  # padding


@pytest.mark.parametrize("path", GOLDEN_OPS, ids=lambda p: p.stem)
def test_golden_float32(path):
    d = torch.load(path, weights_only=True)
    inputs = (d["input"].float(), d["offset_mask"].float())
    results = run_with_grads(dcnv4, inputs, d["grad_output"].float(), golden_args(d["hparams"]))
    # The golden README's float32 tolerances (the raw mask makes values up to ~9, grads ~86).
    tolerances = {"output": 2e-5, "grad_input": 2e-5, "grad_offset_mask": 2e-4}
    for name, got in zip(tolerances, results, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), d[name], rtol=0, atol=tolerances[name], msg=name)


@pytest.mark.parametrize("path", GOLDEN_OPS, ids=lambda p: p.stem)
def test_golden_split_layout_is_dcnv3(path):
    """The golden file's own DCNv3 split of offset_mask gives the same result through dcnv3."""
    d = torch.load(path, weights_only=True)
    args = golden_args(d["hparams"])
    torch.testing.assert_close(dcnv3(d["input"], d["offset"], d["mask"], *args), d["output"],
                               rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# One sampling core: dcnv4 is dcnv3 on the split tensors, for any shape


SHAPES = {
    "gc8": dict(group=4, gc=8),
    "gc16": dict(group=4, gc=16),
    "gc24": dict(group=2, gc=24),
    "gc32": dict(group=2, gc=32),
    "gc64": dict(group=1, gc=64),
    "gc3_odd": dict(group=5, gc=3),
    "gc1": dict(group=3, gc=1),
    "kernel5_rc": dict(kernel=(5, 5), pad=(2, 2), remove_center=True, gc=16),
    "kernel1": dict(kernel=(1, 1), pad=(0, 0)),
    "kernel2x3_stride2_dil2": dict(kernel=(2, 3), stride=(2, 1), pad=(1, 2), dil=(2, 2)),
    "no_padding_channels": dict(extra=0),
    "one_padding_channel": dict(extra=1, gc=16),
    "batch5_1x1_map": dict(n=5, h=1, w=1),
    "offset_scale_half": dict(offset_scale=0.5, gc=16),
    "large_map": dict(n=1, h=23, w=19, group=2, gc=16),
}


@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
def test_dcnv4_is_dcnv3_on_the_split_tensors(case):
    (x, offset_mask), args = random_case(**case)
    offset, mask = split(offset_mask, args[4], points_of(args))
    grad = torch.randn(dcnv3(x, offset, mask, *args).shape, dtype=x.dtype)
    out4, grad_x4, grad_om4 = run_with_grads(dcnv4, (x, offset_mask), grad, args)
    out3, grad_x3, grad_off3, grad_mask3 = run_with_grads(dcnv3, (x, offset, mask), grad, args)
    # Both ops run the same kernels on the same numbers: bit-identical.
    assert torch.equal(out4, out3)
    assert torch.equal(grad_x4, grad_x3)
    grad_offset4, grad_mask4 = split(grad_om4, args[4], points_of(args))
    assert torch.equal(grad_offset4, grad_off3) and torch.equal(grad_mask4, grad_mask3)
    assert (grad_om4[..., 3 * args[4] * points_of(args):] == 0).all()


@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
def test_compiled_matches_reference(case):
    inputs, args = random_case(**case)
    grad = torch.randn(dcnv4_reference(*inputs, *args).shape, dtype=inputs[0].dtype)
    got = run_with_grads(dcnv4, inputs, grad, args)
    want = run_with_grads(dcnv4_reference, inputs, grad, args)
    for name, a, b in zip(("output", "grad_input", "grad_offset_mask"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_padding_channels_are_never_read():
    (x, offset_mask), args = random_case(extra=7, gc=16)
    used = 3 * args[4] * points_of(args)
    poisoned = offset_mask.clone()
    poisoned[..., used:] = float("nan")
    torch.testing.assert_close(dcnv4(x, poisoned, *args), dcnv4(x, offset_mask, *args),
                               rtol=0, atol=0)
    _, grad_om = BACKWARD_OP(torch.ones(dcnv4(x, offset_mask, *args).shape, dtype=x.dtype), x,
                             poisoned, *(list(a) if isinstance(a, tuple) else a for a in args))
    assert torch.isfinite(grad_om).all() and (grad_om[..., used:] == 0).all()


def test_strided_offset_mask_view():
    """A channel slice of a wider tensor (not contiguous) works like its copy."""
    (x, offset_mask), args = random_case(extra=3, gc=8)
    wide = torch.cat([offset_mask, torch.randn(*offset_mask.shape[:3], 9,
                                               dtype=offset_mask.dtype)], -1)
    view = wide[..., : offset_mask.shape[-1]]
    assert not view.is_contiguous()
    torch.testing.assert_close(dcnv4(x, view, *args), dcnv4(x, offset_mask, *args),
                               rtol=0, atol=0)


@pytest.mark.parametrize(
    "case",
    [dict(), dict(kernel=(3, 2), stride=(2, 1), pad=(0, 1), remove_center=True, gc=3),
     dict(h=1, w=1, offset_std=0.7)],
)
def test_gradcheck_float64(case):
    inputs, args = random_case(n=1, **case)
    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: dcnv4(*t, *args), leaves, eps=1e-6, atol=1e-7)


def op_sample(inputs, args):
    kernel, stride, pad, dil, group, gc, scale, rc = args
    return (*inputs, list(kernel), list(stride), list(pad), list(dil), group, gc, scale, rc)


def test_opcheck():
    for case in (dict(), dict(kernel=(3, 2), stride=(2, 1), pad=(0, 1), remove_center=True)):
        inputs, args = random_case(**case)
        sample = op_sample(inputs, args)
        torch.library.opcheck(OP, sample)
        leaves = tuple(t.clone().requires_grad_() for t in inputs)
        torch.library.opcheck(OP, (*leaves, *sample[2:]))
        grad = torch.randn(OP(*sample).shape, dtype=torch.float64)
        torch.library.opcheck(BACKWARD_OP, (grad, *sample))


def test_compile_fullgraph_matches_eager():
    inputs, args = random_case(dtype=torch.float32, gc=16)
    leaves = [t.clone().requires_grad_() for t in inputs]

    def f(x, offset_mask):
        return dcnv4(x * 2.0, offset_mask, *args).relu()

    explanation = torch._dynamo.explain(f)(*inputs)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = compiled(*leaves)
    out.sum().backward()
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    expected = f(*eager_leaves)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_double_backward_is_refused():
    inputs, args = random_case()
    leaves = [t.requires_grad_() for t in inputs]
    out = dcnv4(*leaves, *args)
    (grad_x,) = torch.autograd.grad(out.sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_reduced_precision_against_float32(dtype, atol):
    inputs, args = random_case(group=2, gc=16, dtype=torch.float32)
    grad = torch.randn(2, 6, 7, 32)
    low = run_with_grads(dcnv4, [t.to(dtype) for t in inputs], grad.to(dtype), args)
    rounded = [t.to(dtype).float() for t in inputs]
    high = run_with_grads(dcnv4, rounded, grad.to(dtype).float(), args)
    for name, a, b in zip(("output", "grad_input", "grad_offset_mask"), low, high, strict=True):
        assert a.dtype == dtype, name
        scale = b.abs().max().clamp_min(1)
        torch.testing.assert_close(a.float() / scale, b / scale, rtol=0, atol=atol, msg=name)


def test_zero_size_batch():
    (x, offset_mask), args = random_case(n=0)
    leaves = [t.requires_grad_() for t in (x, offset_mask)]
    out = dcnv4(*leaves, *args)
    assert out.shape == (0, 6, 7, 8)
    out.sum().backward()
    assert leaves[0].grad.shape == x.shape and leaves[1].grad.shape == offset_mask.shape


def test_non_finite_offsets_contribute_nothing():
    (x, offset_mask), args = random_case(n=1, h=5, w=5, group=2, gc=3, extra=0)
    offset_mask = offset_mask.clone()
    offset_mask[..., 0] = float("nan")  # group 0, point 0, x
    offset_mask[..., 28] = float("inf")  # group 1, point 0, y
    leaves = [t.clone().requires_grad_() for t in (x, offset_mask)]
    out = dcnv4(*leaves, *args)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all()
    assert torch.isfinite(leaves[0].grad).all() and torch.isfinite(leaves[1].grad).all()
    assert (leaves[1].grad[..., [0, 1, 18, 27, 28, 45]] == 0).all()  # offsets and masks


def test_backward_is_deterministic_across_runs_and_threads():
    inputs, args = random_case(n=2, h=12, w=12, group=4, gc=16, dtype=torch.float32)
    grad = torch.randn(2, 12, 12, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 3, 1):
            torch.set_num_threads(n_threads)
            results.append(run_with_grads(dcnv4, inputs, grad, args))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Autocast: one policy, the dispatcher's, for dcnv3 and dcnv4 alike


def autocast_inputs(op, dtypes):
    """Arguments of `op` ('dcnv3' or 'dcnv4') with its tensors in `dtypes`, and the rest."""
    (x, offset_mask), args = random_case(group=2, gc=16, dtype=torch.float32)
    if op == "dcnv4":
        tensors = (x, offset_mask)
    else:
        tensors = (x, *split(offset_mask, 2, 9))
    return [t.to(d) for t, d in zip(tensors, dtypes, strict=False)], args


AUTOCAST_CASES = {
    # (tensor dtypes, autocast dtype, expected output dtype)
    "float16_under_bfloat16": ((torch.float16,) * 3, torch.bfloat16, torch.bfloat16),
    "float32_under_bfloat16": ((torch.float32,) * 3, torch.bfloat16, torch.bfloat16),
    "mixed_under_bfloat16": ((torch.float32, torch.float16, torch.bfloat16), torch.bfloat16,
                             torch.bfloat16),
    "bfloat16_under_float16": ((torch.bfloat16,) * 3, torch.float16, torch.float16),
    "mixed_under_float16": ((torch.float16, torch.float32, torch.float32), torch.float16,
                            torch.float16),
    "float64_untouched": ((torch.float64,) * 3, torch.bfloat16, torch.float64),
}


@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
@pytest.mark.parametrize("case", AUTOCAST_CASES.values(), ids=AUTOCAST_CASES.keys())
def test_autocast_policy(op, case):
    dtypes, autocast_dtype, expected_dtype = case
    fn = dcnv3 if op == "dcnv3" else dcnv4
    tensors, args = autocast_inputs(op, dtypes)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = fn(*tensors, *args)
        raw = getattr(torch.ops.internimage, op).default(*op_sample(tensors, args))
    assert out.dtype == raw.dtype == expected_dtype
    # The same as casting every tensor to the op's dtype by hand, outside autocast.
    expected = fn(*(t.to(expected_dtype) for t in tensors), *args)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(raw, expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
def test_autocast_gradients_come_back_in_the_leaves_dtypes(op):
    fn = dcnv3 if op == "dcnv3" else dcnv4
    tensors, args = autocast_inputs(op, (torch.float32, torch.float16, torch.float16))
    leaves = [t.requires_grad_() for t in tensors]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*leaves, *args)
    out.float().sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
def test_autocast_leaves_float64_mixes_to_the_op_checks(op):
    fn = dcnv3 if op == "dcnv3" else dcnv4
    tensors, args = autocast_inputs(op, (torch.float64, torch.float32, torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
        RuntimeError, match="must have the input.s dtype Double, got BFloat16"
    ):
        fn(*tensors, *args)


@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
def test_autocast_under_compile(op):
    fn = dcnv3 if op == "dcnv3" else dcnv4
    tensors, args = autocast_inputs(op, (torch.float16, torch.float32, torch.float32))

    def f(*t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*t, *args)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*tensors)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, f(*tensors), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the argument, the expected and the actual value


def bad_call(**overrides):
    (x, offset_mask), args = random_case(n=1, h=4, w=5, group=2, gc=3, extra=2)
    kernel, stride, pad, dil, group, gc, scale, rc = args
    call = dict(input=x, offset_mask=offset_mask, kernel_size=kernel, stride=stride,
                padding=pad, dilation=dil, group=group, group_channels=gc, offset_scale=scale,
                remove_center=rc)
    call.update(overrides)
    return call


BAD_INPUTS = {
    "input rank": (lambda c: dict(input=c["input"][0]), ValueError, r"input must be 4-D.*3-D"),
    "channels": (
        lambda c: dict(group_channels=4),
        ValueError,
        r"dcnv4: input channels must equal group \* group_channels = 2 \* 4 = 8, got 6",
    ),
    "offset_mask too narrow": (
        lambda c: dict(offset_mask=c["offset_mask"][..., :53]),
        ValueError,
        r"offset_mask must have shape \(1, 4, 5, C\) with C >= 3 \* group \* points = "
        r"3 \* 2 \* 9 = 54, got \(1, 4, 5, 53\)",
    ),
    "offset_mask spatial": (
        lambda c: dict(offset_mask=c["offset_mask"][:, :3]),
        ValueError,
        r"offset_mask must have shape \(1, 4, 5, C\) with C >= .* got \(1, 3, 5, 56\)",
    ),
    "offset_mask dtype": (
        lambda c: dict(offset_mask=c["offset_mask"].float()),
        TypeError,
        r"offset_mask must have the input's dtype torch.float64, got torch.float32",
    ),
    "offset_mask device": (
        lambda c: dict(offset_mask=c["offset_mask"].to("meta")),
        ValueError,
        r"offset_mask must be on the input's device cpu, got meta",
    ),
    "integer input": (lambda c: dict(input=c["input"].long()), TypeError,
                      r"input must be a floating-point"),
    "zero kernel": (lambda c: dict(kernel_size=0), ValueError,
                    r"kernel_size must be >= 1, got \(0, 0\)"),
    "negative padding": (lambda c: dict(padding=(1, -1)), ValueError,
                         r"padding must be >= 0, got \(1, -1\)"),
    "zero group": (lambda c: dict(group=0), ValueError, r"group must be >= 1, got 0"),
    "float group": (lambda c: dict(group=2.0), TypeError, r"group must be an int, got 2.0"),
    "kernel triple": (lambda c: dict(kernel_size=(3, 3, 3)), TypeError,
                      r"kernel_size must be an int or a pair"),
    "no output": (lambda c: dict(kernel_size=9, padding=0), ValueError,
                  r"output size must be >= 1, got \(-4, -3\)"),
    "nan offset_scale": (lambda c: dict(offset_scale=float("nan")), ValueError,
                         r"offset_scale must be a finite"),
}


@pytest.mark.parametrize("fn", [dcnv4, dcnv4_reference], ids=["compiled", "reference"])
@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_named_error(fn, case):
    make_overrides, error, pattern = case
    call = bad_call()
    call.update(make_overrides(call))
    with pytest.raises(error, match=pattern):
        fn(**call)


def test_compiled_op_checks_its_arguments_too():
    (x, offset_mask), _ = random_case(n=1, h=4, w=5, group=2, gc=3, extra=0)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], 2, 3, 1.0, False)
    with pytest.raises(RuntimeError, match=r"dcnv4: offset_mask must have shape \(1, 4, 5, C\) "
                       r"with C >= 3 \* group \* points = 3 \* 2 \* 9 = 54, got \[1, 4, 5, 50\]"):
        OP(x, offset_mask[..., :50], *geometry)
    with pytest.raises(RuntimeError, match=r"dcnv4: grad_output must have shape"):
        BACKWARD_OP(torch.zeros(1, 4, 4, 6, dtype=x.dtype), x, offset_mask, *geometry)
    with pytest.raises(RuntimeError, match=r"dcnv4: group_channels must be >= 1, got 0"):
        OP(x, offset_mask, [3, 3], [1, 1], [1, 1], [1, 1], 2, 0, 1.0, False)
