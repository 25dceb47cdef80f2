"""The CUDA kernels (csrc/cuda/dcn_kernel.cu, the same file nvcc compiles) run on the CPU under the
emulation of the CUDA execution model (csrc/emulation), as sm_80 and as sm_90: golden files,
modules and small models, every dtype against the CPU kernels, and the launch plan's corners.
The emulation checks every global access, alignment and warp shuffle; the planted faults at the
end prove those checks bite. Never skipped: without the emulated ops these tests fail.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import (
    GOLDEN_FLASH_DIR,
    build_golden_model,
    golden_files,
    load_golden,
)
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

import internimage.ops as ops_module
from internimage import DCNv3, DCNv4, FlashInternImage, InternImage
from internimage.dcnv3 import convert_dcnv3_state_dict
from internimage.ops import cuda_emulation_available, extension_error

if not cuda_emulation_available():  # fail loudly: these tests are the CUDA kernels' only run
    raise RuntimeError(
        "the emulated CUDA ops (internimage::_emulated_cuda_*) are missing from internimage._C "
        f"({extension_error() or 'built without csrc/emulation'}); rebuild with "
        "pip install --no-build-isolation -e ."
    )

OPS = torch.ops.internimage
GRADS3 = ("output", "grad_input", "grad_offset", "grad_mask")
GRADS4 = ("output", "grad_input", "grad_offset_mask")


@pytest.fixture(params=(800, 900), ids=("sm80", "sm90"))
def arch(request, monkeypatch) -> int:
    """Runs the test on the sm_80 build (float atomics) and the sm_90 one (float4 atomics)."""
    monkeypatch.setenv("INTERNIMAGE_EMULATION_ARCH", str(request.param))
    return request.param


def run3(x, offset, mask, grad, params, emulated=True):
    forward, backward = (
        (OPS._emulated_cuda_dcnv3, OPS._emulated_cuda_dcnv3_backward) if emulated
        else (OPS.dcnv3, OPS._dcnv3_backward)
    )
    return (forward.default(x, offset, mask, *params),
            *backward.default(grad, x, offset, mask, *params))


def run4(x, offset_mask, grad, params, emulated=True):
    forward, backward = (
        (OPS._emulated_cuda_dcnv4, OPS._emulated_cuda_dcnv4_backward) if emulated
        else (OPS.dcnv4, OPS._dcnv4_backward)
    )
    return (forward.default(x, offset_mask, *params),
            *backward.default(grad, x, offset_mask, *params))


def plan(case: Case, dtype: torch.dtype, aligned: bool = True, sms: int = 132) -> dict:
    """csrc/launch_plan.h's plan for a DCNv3 call of `case` (the kernels' view of it)."""
    out_h, out_w = case.out_size()
    item = torch.empty((), dtype=dtype).element_size()
    largest = case.n * max(case.height * case.width, out_h * out_w) * case.group * max(
        case.group_channels, 3 * case.points)
    fields = OPS._cuda_launch_plan(case.n, out_h, out_w, case.group, case.group_channels, item,
                                   1024 if aligned else 1024 + item, largest, sms)
    return dict(zip(("vec", "lanes_log2", "total", "total_padded", "blocks", "use_int32"),
                    fields, strict=True))


def compare3(case: Case, dtype: torch.dtype, seed: int, label: str):
    inputs = make_inputs(case, dtype, seed=seed)
    expected = run3(*inputs, case.params(), emulated=False)
    actual = run3(*inputs, case.params())
    rtol, atol_rel = TOLERANCES[dtype]
    for name, a, e in zip(GRADS3, actual, expected, strict=True):
        assert a.shape == e.shape, f"{label}/{name}: shape {a.shape} != {e.shape}"
        assert_close_scaled(a, e, rtol, atol_rel, f"{label}/{name}")


# ---------------------------------------------------------------------------------------------
# Golden files: float64, forward and every gradient, within the golden READMEs' 1e-10


@pytest.mark.parametrize("path", golden_files("op_*.pt"), ids=lambda p: p.stem)
def test_golden_dcnv3_ops(path, arch):
    d = torch.load(path, weights_only=True)
    tensors = (d[k] for k in ("input", "offset", "mask", "grad_output"))
    for name, got in zip(GRADS3, run3(*tensors, golden_args(d["hparams"])), strict=True):
        torch.testing.assert_close(got, d[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("path", golden_files("op_*.pt", GOLDEN_FLASH_DIR), ids=lambda p: p.stem)
def test_golden_dcnv4_ops(path, arch):
    d = torch.load(path, weights_only=True)
    h = d["hparams"]
    tensors = (d[k] for k in ("input", "offset_mask", "grad_output"))
    results = run4(*tensors, golden_args(h))
    for name, got in zip(GRADS4, results, strict=True):
        torch.testing.assert_close(got, d[name], rtol=0, atol=1e-10, msg=name)
    assert (results[2][..., h["offset_mask_used_channels"]:] == 0).all()  # padding


# The modules and models reach the ops through these two functions of the op layer (the
# eager path of dcnv3_core / dcnv4_core); the tests below point them at the emulated ops.


class _EmulatedDcnv3(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x, offset, mask, params):
        _EmulatedDcnv3.calls += 1
        ctx.save_for_backward(x, offset, mask)
        ctx.params = params
        return OPS._emulated_cuda_dcnv3.default(x, offset, mask, *params)

    @staticmethod
    def backward(ctx, grad):
        grads = OPS._emulated_cuda_dcnv3_backward.default(grad, *ctx.saved_tensors, *ctx.params)
        return (*grads, None)


class _EmulatedDcnv4(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x, offset_mask, params):
        _EmulatedDcnv4.calls += 1
        ctx.save_for_backward(x, offset_mask)
        ctx.params = params
        return OPS._emulated_cuda_dcnv4.default(x, offset_mask, *params)

    @staticmethod
    def backward(ctx, grad):
        grads = OPS._emulated_cuda_dcnv4_backward.default(grad, *ctx.saved_tensors, *ctx.params)
        return (*grads, None)


def _emulated_dcnv3_eager(value, offset, mask_logits, k, p, d, group, group_channels,
                          offset_scale, remove_center):
    points = k[0] * k[1] - int(remove_center)
    offset, mask = ops_module._offset_and_mask(value, offset, mask_logits, group, points)
    params = (k, [1, 1], p, d, group, group_channels, offset_scale, remove_center)
    return _EmulatedDcnv3.apply(value, offset, mask, params)


def _emulated_dcnv4_eager(value, offset_mask, *params):
    return _EmulatedDcnv4.apply(value, offset_mask, params)


def _route_cores_to_emulation(monkeypatch) -> None:
    monkeypatch.setattr(ops_module, "_dcnv3_module_eager", _emulated_dcnv3_eager)
    monkeypatch.setattr(ops_module, "_dcnv4_module_eager", _emulated_dcnv4_eager)


@pytest.fixture
def emulated_cores(monkeypatch):
    """Routes the DCNv3 and DCNv4 modules' core op calls to the emulated CUDA ops."""
    _route_cores_to_emulation(monkeypatch)
    before = _EmulatedDcnv3.calls + _EmulatedDcnv4.calls
    yield
    assert _EmulatedDcnv3.calls + _EmulatedDcnv4.calls > before, "no core ran emulated"


def test_golden_dcnv3_module(emulated_cores):
    d = load_golden("module_dcnv3_basic.pt")
    module = DCNv3(**d["config"], core_op="DCNv3").double()
    module.load_state_dict(convert_dcnv3_state_dict(d["state_dict"]))
    x = d["input"].clone().requires_grad_()
    out = module(x)
    out.backward(d["grad_output"])
    torch.testing.assert_close(out, d["output"], rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, d["grad_input"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", golden_files("module_*.pt", GOLDEN_FLASH_DIR),
                         ids=lambda p: p.stem)
def test_golden_dcnv4_modules(path, emulated_cores):
    d = torch.load(path, weights_only=True)
    module = DCNv4(**d["config"], core_op="DCNv4")
    module.load_state_dict(d["state_dict"])
    module = module.double()
    x = d["input"].clone().requires_grad_()
    out = module(x)
    out.backward(d["grad_output"])
    torch.testing.assert_close(out, d["output"], rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, d["grad_input"], rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "model_class,golden_name,core_op",
    [(InternImage, "model_t_like.pt", "DCNv3"),
     (FlashInternImage, "../golden-flash/model_flash_t_like.pt", "DCNv4")],
    ids=("internimage", "flash_internimage"),
)
def test_small_model_matches_cpu_kernels(model_class, golden_name, core_op, monkeypatch):
    """A small model whose DCN cores run emulated: forward and every gradient against the same
    model on the CPU kernels, in float32."""
    golden = load_golden(golden_name)
    model = build_golden_model(model_class, golden, core_op, torch.float32)
    x = golden["input"][:1].float()
    grad = torch.randn(1, model.num_classes, generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        leaf = x.clone().requires_grad_()
        logits = model(leaf)
        logits.backward(grad)
        return {"logits": logits.detach(), "input": leaf.grad} | {
            name: p.grad.clone() for name, p in model.named_parameters()}

    expected = run()
    _route_cores_to_emulation(monkeypatch)
    calls = _EmulatedDcnv3.calls + _EmulatedDcnv4.calls
    actual = run()
    assert _EmulatedDcnv3.calls + _EmulatedDcnv4.calls - calls == sum(golden["config"]["depths"])
    for name, e in expected.items():
        # float32 sums in another order (atomics, per-lane partial sums): a few ulps.
        assert_close_scaled(actual[name], e, 1e-4, 2e-5, name)


# ---------------------------------------------------------------------------------------------
# Every dtype against the CPU kernels on fresh random inputs (the GPU tests' shared cases)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_dcnv3_matches_cpu_kernels(name, dtype, arch):
    compare3(CASES[name], dtype, zlib.crc32(name.encode()), f"{name}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", DCNV4_CASES)
def test_dcnv4_matches_cpu_kernels(name, dtype, arch):
    case = DCNV4_CASES[name]
    inputs = make_dcnv4_inputs(case, dtype, extra=3, seed=zlib.crc32(name.encode()))
    expected = run4(*inputs, case.params(), emulated=False)
    actual = run4(*inputs, case.params())
    rtol, atol_rel = TOLERANCES[dtype]
    for label, a, e in zip(GRADS4, actual, expected, strict=True):
        assert_close_scaled(a, e, rtol, atol_rel, f"{name}/{dtype}/{label}")
    assert (actual[2][..., 3 * case.group * case.points:] == 0).all()  # padding: no gradient


def test_shared_cases_cover_every_lane_count_and_both_vector_widths():
    lanes, widths = set(), set()
    for case in CASES.values():
        for dtype in DTYPES:
            p = plan(case, dtype)
            lanes.add(1 << p["lanes_log2"])
            widths.add("full" if p["vec"] > 1 else "scalar")
    assert lanes == {1, 2, 4, 8, 16, 32}
    assert widths == {"full", "scalar"}


# ---------------------------------------------------------------------------------------------
# The launch plan's corners


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_misaligned_storage_takes_the_scalar_path(dtype, arch):
    """A storage offset of one element defeats the 16-byte vectors; results do not change."""
    case = CASES["gc16"]
    assert plan(case, dtype)["vec"] == 16 // torch.empty((), dtype=dtype).element_size()
    assert plan(case, dtype, aligned=False)["vec"] == 1
    x, offset, mask, grad = make_inputs(case, dtype, seed=5)

    def misaligned(t):
        return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)

    expected = run3(x, offset, mask, grad, case.params(), emulated=False)
    shifted = run3(misaligned(x), offset, mask, misaligned(grad), case.params())
    rtol, atol_rel = TOLERANCES[dtype]
    for label, a, e in zip(GRADS3, shifted, expected, strict=True):
        assert_close_scaled(a, e, rtol, atol_rel, label)


@pytest.mark.parametrize("force_int64", (False, True), ids=("int32", "int64"))
def test_grid_stride_loops_run_several_rounds(force_int64, monkeypatch):
    """One SM: 32 blocks of 256 threads, so each thread runs three rounds of the loops."""
    case = Case(3, 16, 16, 8, 16)
    p = plan(case, torch.float32, sms=1)
    assert p["blocks"] == 32 and p["total_padded"] == 3 * 32 * 256
    monkeypatch.setenv("INTERNIMAGE_EMULATION_SMS", "1")
    if force_int64:
        monkeypatch.setenv("INTERNIMAGE_EMULATION_FORCE_INT64", "1")
    compare3(case, torch.float32, 21, "rounds")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ("gc16", "gc71_stride2_dil2", "gc5_scale0.5"))
def test_int64_index_path(name, dtype, arch, monkeypatch):
    assert plan(CASES[name], dtype)["use_int32"]  # what these sizes get without the knob
    monkeypatch.setenv("INTERNIMAGE_EMULATION_FORCE_INT64", "1")
    compare3(CASES[name], dtype, 31, f"int64/{name}")


def test_backward_with_padded_inactive_lanes(arch):
    """45 slots x 8 lanes = 360 threads: the last warp has 24 lanes past `total`, which must
    still meet the others at every shuffle."""
    case = Case(1, 3, 5, 3, 5)
    p = plan(case, torch.float32)
    assert p["total"] % 32 != 0 and p["total_padded"] == p["total"] + 24
    compare3(case, torch.float32, 41, "padded")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_dcnv4_padding_is_never_read(dtype, arch):
    case = DCNV4_CASES["gc16_stride2_dil2"]
    x, offset_mask, grad = make_dcnv4_inputs(case, dtype, extra=7, seed=9)
    used = 3 * case.group * case.points
    poisoned = offset_mask.clone()
    poisoned[..., used:] = float("nan")
    clean = run4(x, offset_mask, grad, case.params())
    dirty = run4(x, poisoned, grad, case.params())
    for label, a, b in zip(GRADS4, dirty, clean, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=label)
    assert (dirty[2][..., used:] == 0).all()


# ---------------------------------------------------------------------------------------------
# The checks bite: planted faults fail the op with the kernel, thread and address


def test_planted_out_of_bounds_read_is_caught(monkeypatch):
    """Registering `input` 4 bytes short makes the kernels' reads of its last channel
    out-of-bounds: forward and backward fail naming kernel, thread and tensor."""
    case = CASES["gc5_scale0.5"]
    x, offset, mask, grad = make_inputs(case, torch.float32, seed=1)
    x[:, -1, -1, :] = 0  # whatever was read there before
    run3(x, offset, mask, grad, case.params())  # fine before the plant
    monkeypatch.setenv("INTERNIMAGE_EMULATION_SHRINK", "input:4")
    offset = torch.zeros_like(offset)  # every pixel samples itself, the last one included
    with pytest.raises(RuntimeError, match=r"dcn_forward_kernel, block \(\d+,0,0\), thread "
                       r"\(\d+,0,0\).*out-of-bounds load of 4 bytes .* of 'input'"):
        OPS._emulated_cuda_dcnv3.default(x, offset, mask, *case.params())
    with pytest.raises(RuntimeError, match=r"dcn_backward_kernel, .*out-of-bounds load"):
        OPS._emulated_cuda_dcnv3_backward.default(grad, x, offset, mask, *case.params())


def test_planted_divergent_shuffle_is_caught(monkeypatch):
    """A backward that loops to `total` instead of whole warps lets the last warp's padded
    lanes exit while the others wait at a shuffle: on a GPU a hang or garbage, here an error
    naming the kernel, block and lane."""
    case = Case(1, 3, 5, 3, 5)
    x, offset, mask, grad = make_inputs(case, torch.float32, seed=2)
    monkeypatch.setenv("INTERNIMAGE_EMULATION_UNPAD", "1")
    with pytest.raises(RuntimeError, match=r"dcn_backward_kernel, block \(1,0,0\), thread "
                       r"\(104,0,0\) \(warp 3, lane 8\): divergent shuffle: the lane exited"):
        OPS._emulated_cuda_dcnv3_backward.default(grad, x, offset, mask, *case.params())
    OPS._emulated_cuda_dcnv3.default(x, offset, mask, *case.params())  # no shuffle: runs


def test_errors_and_deterministic_mode_match_the_cuda_ops():
    case = CASES["gc16"]
    x, offset, mask, grad = make_inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match="mask must have the input's dtype"):
        OPS._emulated_cuda_dcnv3.default(x, offset, mask.double(), *case.params())
    was_on = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="dcnv3_backward_cuda"):
            OPS._emulated_cuda_dcnv3_backward.default(grad, x, offset, mask, *case.params())
    finally:
        torch.use_deterministic_algorithms(was_on)
