"""Deployment exports of InternImage models: ONNX (for onnxruntime or a plugin runtime) and
TorchScript.

ONNX goes through PyTorch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``,
the default and maintained exporter in torch 2.14):

1. :func:`torch.export.export` captures the model (eval mode) as an ``ExportedProgram``, with
   a symbolic batch dimension when ``dynamic_batch`` is set. Each DCNv3 / DCNv4 module on the
   compiled op (``core_op='DCNv3'`` / ``'DCNv4'``) appears in that graph as one
   ``internimage::dcnv3`` / ``internimage::dcnv4`` node (its fake kernel gives the shapes);
   modules on the ``*_pytorch`` core ops contribute the reference's standard ops directly.
2. Default (``custom_op=False``): :meth:`ExportedProgram.run_decompositions` replaces every
   ``internimage::dcnv3`` node by :func:`internimage.ops.dcnv3_reference` (the tested
   pure-PyTorch implementation: arithmetic for the sampling locations, one ``grid_sample``
   per call), and every ``internimage::dcnv4`` node by
   :func:`internimage.ops.dcnv4_reference` (the same after slicing the packed offset_mask),
   which the exporter lowers to standard ONNX operators (``GridSample``, ``Mul``,
   ``ReduceSum``, ...). Any ONNX runtime supporting the file's opset (20 by default, 18 at
   the lowest) runs it.
3. ``custom_op=True``: a custom translation turns each ``internimage::dcnv3`` node into a
   single node ``internimage::DCNv3`` (domain :data:`ONNX_DOMAIN`, version
   :data:`ONNX_DOMAIN_VERSION`) with inputs ``input, offset, mask`` (the op's NHWC layouts)
   and attributes ``kernel_size``, ``stride``, ``padding``, ``dilation`` (INTS, ``[h, w]``),
   ``group``, ``group_channels`` (INT), ``offset_scale`` (FLOAT) and ``remove_center`` (INT
   0/1), for runtimes with a DCNv3 plugin (TensorRT, a custom onnxruntime op library, ...).
   Each ``internimage::dcnv4`` node likewise becomes one ``internimage::DCNv4`` node with
   inputs ``input, offset_mask`` and the same attributes.

The model is never left modified: training flags (and, for ``custom_op=True``, the
``core_op`` of reference modules, temporarily switched to the compiled op) are restored even
when the export fails. See ``docs/deploy.md`` for the other deployment paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from internimage import ops
from internimage.dcnv3 import DCNv3
from internimage.dcnv4 import DCNv4

__all__ = [
    "ONNX_DOMAIN",
    "ONNX_DOMAIN_VERSION",
    "ONNX_OP_TYPE",
    "ONNX_OP_TYPE_DCNV4",
    "export_onnx",
    "verify_onnx",
    "export_torchscript",
]

#: Domain, version and type of the custom node emitted with ``custom_op=True``.
ONNX_DOMAIN = "internimage"
ONNX_DOMAIN_VERSION = 1
ONNX_OP_TYPE = "DCNv3"
ONNX_OP_TYPE_DCNV4 = "DCNv4"

#: Example batch used to trace a dynamic batch dimension (1 would be specialised by
#: torch.export's 0/1 rule, so the graph would not generalise).
_DYNAMIC_EXAMPLE_BATCH = 2


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_path(path: Any) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _check_img_size(img_size: Any) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        sizes = (img_size, img_size)
    elif isinstance(img_size, Sequence) and not isinstance(img_size, str):
        sizes = tuple(img_size)
    else:
        raise TypeError(
            f"img_size must be an int or an (height, width) pair, got {type(img_size).__name__} "
            f"{img_size!r}"
        )
    if len(sizes) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes
    ):
        raise ValueError(
            f"img_size must be a positive int or a pair of positive ints, got {img_size!r}"
        )
    return sizes  # type: ignore[return-value]


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_batch(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Helpers


def _example_input(
    model: nn.Module, batch: int, img_size: tuple[int, int], seed: int = 0
) -> Tensor:
    """A random ``(batch, in_chans, H, W)`` input on the model's device, in its dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    in_chans = int(getattr(model, "in_chans", 3))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_chans, *img_size, generator=generator, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


@contextmanager
def _export_mode(model: nn.Module, compiled_core: bool) -> Iterator[None]:
    """Puts every submodule in eval mode (and, with ``compiled_core``, every DCNv3 module on
    the compiled op) for the duration; restores each flag afterwards, even on error."""
    training = [(m, m.training) for m in model.modules()]
    core_ops = [(m, m.core_op) for m in model.modules() if isinstance(m, DCNv3 | DCNv4)]
    try:
        model.eval()
        if compiled_core:
            for module, _ in core_ops:
                module.core_op = "DCNv3" if isinstance(module, DCNv3) else "DCNv4"
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for module, core_op in core_ops:
            module.core_op = core_op


_INPUT_DOCS = {
    ONNX_OP_TYPE: (
        "InternImage DCNv3 core (see internimage.ops): NHWC input, offset, mask.",
        [
            ("input", "(N, H_in, W_in, group * group_channels)"),
            ("offset", "(N, H_out, W_out, group * P * 2)"),
            ("mask", "(N, H_out, W_out, group * P)"),
        ],
    ),
    ONNX_OP_TYPE_DCNV4: (
        "FlashInternImage DCNv4 core (see internimage.ops): NHWC input, packed offset_mask "
        "(per group 2P offsets then P raw mask values, padded to C >= 3 * group * P).",
        [
            ("input", "(N, H_in, W_in, group * group_channels)"),
            ("offset_mask", "(N, H_out, W_out, C)"),
        ],
    ),
}


def _dcnv3_onnx_op(op_type: str = ONNX_OP_TYPE) -> Any:
    """The onnxscript ``Op`` for ``internimage::DCNv3`` (or ``::DCNv4``), built once, with an
    explicit schema, so nothing is registered in ONNX's global schema registry."""
    if op_type in _ONNX_OPS:
        return _ONNX_OPS[op_type]
    import onnxscript
    from onnx.defs import OpSchema

    attr = OpSchema.AttrType
    doc, inputs = _INPUT_DOCS[op_type]
    schema = OpSchema(
        op_type,
        ONNX_DOMAIN,
        ONNX_DOMAIN_VERSION,
        doc=doc,
        inputs=[OpSchema.FormalParameter(name, "T", text) for name, text in inputs],
        outputs=[
            OpSchema.FormalParameter("output", "T", "(N, H_out, W_out, group * group_channels)")
        ],
        type_constraints=[(
            "T",
            ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"],
            "floating-point tensors",
        )],
        attributes=[
            OpSchema.Attribute("kernel_size", attr.INTS, "[kernel_h, kernel_w]"),
            OpSchema.Attribute("stride", attr.INTS, "[stride_h, stride_w]"),
            OpSchema.Attribute("padding", attr.INTS, "[pad_h, pad_w]"),
            OpSchema.Attribute("dilation", attr.INTS, "[dilation_h, dilation_w]"),
            OpSchema.Attribute("group", attr.INT, "number of groups"),
            OpSchema.Attribute("group_channels", attr.INT, "channels per group"),
            OpSchema.Attribute("offset_scale", attr.FLOAT, "scale of offsets and kernel grid"),
            OpSchema.Attribute("remove_center", attr.INT, "1: drop the centre tap"),
        ],
    )
    _ONNX_OPS[op_type] = onnxscript.values.Op(
        onnxscript.values.Opset(ONNX_DOMAIN, ONNX_DOMAIN_VERSION), op_type, schema
    )
    return _ONNX_OPS[op_type]


_ONNX_OPS: dict[str, Any] = {}


def _attributes(kernel_size, stride, padding, dilation, group, group_channels, offset_scale,
                remove_center) -> dict[str, Any]:
    return dict(
        kernel_size=[int(v) for v in kernel_size],
        stride=[int(v) for v in stride],
        padding=[int(v) for v in padding],
        dilation=[int(v) for v in dilation],
        group=int(group),
        group_channels=int(group_channels),
        offset_scale=float(offset_scale),
        remove_center=int(bool(remove_center)),
    )


def _dcnv3_onnx_translation(
    input: Any,
    offset: Any,
    mask: Any,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> Any:
    """Exporter translation of ``internimage::dcnv3``: one ``internimage::DCNv3`` node."""
    return _dcnv3_onnx_op()(
        input, offset, mask,
        **_attributes(kernel_size, stride, padding, dilation, group, group_channels,
                      offset_scale, remove_center),
    )


def _dcnv4_onnx_translation(
    input: Any,
    offset_mask: Any,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
) -> Any:
    """Exporter translation of ``internimage::dcnv4``: one ``internimage::DCNv4`` node."""
    return _dcnv3_onnx_op(ONNX_OP_TYPE_DCNV4)(
        input, offset_mask,
        **_attributes(kernel_size, stride, padding, dilation, group, group_channels,
                      offset_scale, remove_center),
    )


def _check_custom_op_calls(
    model: nn.Module, program: Any, ops: dict[str, Any], device: torch.device
) -> None:
    """With ``custom_op=True`` every DCNv3 / DCNv4 module must have become an op node; a
    module that fell back to the reference (no kernel for the model's device) would silently
    be exported as standard operators instead. ``ops``: module class name -> op overload."""
    for cls in (DCNv3, DCNv4):
        op = ops[cls.__name__]
        modules = sum(isinstance(m, cls) for m in model.modules())
        calls = sum(node.target is op for node in program.graph.nodes)
        if calls < modules:
            raise RuntimeError(
                f"export_onnx: custom_op=True expected {modules} internimage::"
                f"{cls.__name__.lower()} calls (one per {cls.__name__} module) in the traced "
                f"graph, found {calls}: the compiled op has no kernel for device "
                f"'{device.type}'; export the model on the CPU"
            )


def _require(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the '{module}' package ({error}); install the export extras: "
            "pip install onnx onnxruntime onnxscript"
        ) from error


# ---------------------------------------------------------------------------------------------
# ONNX


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | Sequence[int] = 224,
    dynamic_batch: bool = True,
    custom_op: bool = False,
    *,
    batch_size: int = 1,
    opset_version: int | None = None,
    external_data: bool | None = None,
) -> Path:
    """Exports ``model`` to an ONNX file with one image input ``input`` ``(N, C, H, W)``.

    Args:
        model: an InternImage (or any module holding :class:`~internimage.DCNv3` /
            :class:`~internimage.DCNv4` modules or calling ``internimage::dcnv3`` /
            ``dcnv4``). Exported in eval mode on its current device and dtype; the model is
            left exactly as it was (training flags, ``core_op``).
        path: destination ``.onnx`` file (parent folders are created).
        img_size: input height and width (int or ``(h, w)``); fixed in the graph.
            The clip-head models (H/G) need sides divisible by 32.
        dynamic_batch: make the batch dimension symbolic (``"batch"``); otherwise it is
            fixed to ``batch_size``.
        custom_op: emit one ``internimage::DCNv3`` / ``DCNv4`` node per op call (for runtimes
            with a plugin) instead of the standard-operator decomposition. Needs the compiled
            extension (the op must be traceable); onnxruntime cannot run such a file without
            a custom-op library.
        batch_size: the fixed batch when ``dynamic_batch`` is False.
        opset_version: default ONNX opset, >= 18 (None: the exporter's default, 20 in
            torch 2.14).
        external_data: store the weights in a side file ``<path>.data`` (None: only when
            the model exceeds 2 GB, as ONNX's protobuf limit requires, e.g. InternImage-G).

    Returns:
        The written path.

    Raises:
        TypeError / ValueError: bad arguments (the message names the argument).
        RuntimeError: ``custom_op=True`` without the compiled extension.
        ImportError: ``onnx`` / ``onnxscript`` are not installed.
    """
    model = _check_model(model)
    path = _check_path(path)
    sizes = _check_img_size(img_size)
    dynamic_batch = _check_bool("dynamic_batch", dynamic_batch)
    custom_op = _check_bool("custom_op", custom_op)
    batch_size = _check_batch("batch_size", batch_size)
    if opset_version is not None and (
        isinstance(opset_version, bool) or not isinstance(opset_version, int)
        or opset_version < 18
    ):
        raise ValueError(
            "opset_version must be None or an int >= 18 (the exporter's lowest opset; it cannot "
            f"convert this graph down), got {opset_version!r}"
        )
    if external_data is not None:
        external_data = _check_bool("external_data", external_data)
    if custom_op and not ops.extension_available():
        raise RuntimeError(
            "export_onnx: custom_op=True needs the compiled op torch.ops.internimage.dcnv3, but "
            f"the extension is not available ({ops.extension_error()}); use custom_op=False "
            "for the standard-operator decomposition"
        )
    _require("onnx", "export_onnx")
    _require("onnxscript", "export_onnx")

    batch = _DYNAMIC_EXAMPLE_BATCH if dynamic_batch else batch_size
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)

    with _export_mode(model, compiled_core=custom_op), torch.no_grad():
        x = _example_input(model, batch, sizes)
        program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes, strict=False)
        translations: dict[Callable, Callable] = {}
        if ops.extension_available():
            fused = ops.mask_logits_decompositions()
            if any(node.target in fused for node in program.graph.nodes):
                program = program.run_decompositions(fused)
            dcnv3_op, dcnv4_op = ops.DCNV3.compiled, ops.DCNV4.compiled
            if custom_op:
                _check_custom_op_calls(model, program, {"DCNv3": dcnv3_op, "DCNv4": dcnv4_op},
                                       x.device)
                translations[dcnv3_op] = _dcnv3_onnx_translation
                translations[dcnv4_op] = _dcnv4_onnx_translation
            else:
                program = program.run_decompositions(ops.reference_decompositions())
        num_outputs = len(program.graph_signature.user_outputs)
        output_names = ["output"] if num_outputs == 1 else [f"output{i}" for i in
                                                            range(num_outputs)]
        onnx_program = torch.onnx.export(
            program,
            (x,),
            dynamo=True,
            input_names=["input"],
            output_names=output_names,
            opset_version=opset_version,
            custom_translation_table=translations or None,
            verbose=False,
        )
    if dynamic_batch:
        _rename_batch_dim(onnx_program.model)
    onnx_program.save(path, external_data=external_data)
    return path


def _rename_batch_dim(model: Any, name: str = "batch") -> None:
    """Names the symbolic batch dimension ``name`` everywhere in the ONNX IR model. The
    exporter names it after torch.export's symbol (e.g. 's77'), whatever ``Dim`` was called."""
    import re

    first = model.graph.inputs[0].shape[0]
    if isinstance(first, int) or first.value is None:
        return
    pattern = re.compile(rf"\b{re.escape(first.value)}\b")
    graphs = list(model.graphs()) + [f for f in model.functions.values()]
    for graph in graphs:
        values = list(graph.inputs) + list(graph.outputs)
        values += [out for node in graph for out in node.outputs]
        for value in values:
            shape = value.shape
            if shape is None or not any(
                    not isinstance(d, int) and d.value and pattern.search(d.value)
                    for d in shape):
                continue
            value.shape = type(shape)([
                d if isinstance(d, int) or not d.value else pattern.sub(name, d.value)
                for d in shape
            ])


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | Sequence[int] = 224,
    batch_sizes: Sequence[int] = (1, 2),
    seed: int = 0,
) -> float:
    """Runs an exported file with onnxruntime (CPU) against ``model`` in eval mode.

    Returns the largest relative error ``max|onnx - torch| / max|torch|`` over the batch
    sizes (each a fresh random input). Only files without custom nodes can run.
    The model's training flags are restored afterwards.
    """
    model = _check_model(model)
    path = _check_path(path)
    sizes = _check_img_size(img_size)
    if not batch_sizes:
        raise ValueError(f"batch_sizes must name at least one batch size, got {batch_sizes!r}")
    for b in batch_sizes:
        _check_batch("batch_sizes entry", b)
    ort = _require("onnxruntime", "verify_onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    with _export_mode(model, compiled_core=False), torch.no_grad():
        for i, b in enumerate(batch_sizes):
            x = _example_input(model, b, sizes, seed=seed + i)
            expected = model(x).float().cpu()
            actual = torch.from_numpy(session.run(None, {input_name: x.cpu().numpy()})[0])
            if actual.shape != expected.shape:
                raise ValueError(
                    f"verify_onnx: onnxruntime output shape {tuple(actual.shape)} differs from "
                    f"PyTorch's {tuple(expected.shape)} for batch {b}"
                )
            scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
            worst = max(worst, ((actual.float() - expected).abs().max() / scale).item())
    return worst


# ---------------------------------------------------------------------------------------------
# TorchScript


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | Sequence[int] = 224,
    batch_size: int = 1,
) -> Path:
    """Traces ``model`` (eval mode) with :func:`torch.jit.trace` and saves it.

    The compiled op is a registered TorchScript operator, so the trace records one
    ``internimage::dcnv3`` call per DCNv3 module: loading the file needs
    ``import internimage`` (or loading ``internimage/_C*.so`` with ``torch.ops.load_library``)
    in the consuming process. A model on the reference path (``core_op='DCNv3_pytorch'`` or
    without the extension) traces to standard ops only. Batch size and spatial size of the
    trace generalise because every shape is read from the tensors at run time.
    The model's training flags are restored afterwards.
    """
    model = _check_model(model)
    path = _check_path(path)
    sizes = _check_img_size(img_size)
    batch_size = _check_batch("batch_size", batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(model, compiled_core=False), torch.no_grad():
        x = _example_input(model, batch_size, sizes)
        traced = torch.jit.trace(model, (x,), check_trace=False)
    traced.save(str(path))
    return path
