"""One forward per module: the model runs the same program in every mode, calling every
parametrised submodule, so forward hooks fire and replaced submodules take effect whether
autograd is on or off, in train or eval mode (the field's convention; fast inference is the
explicit ``optimize_for_inference`` transform, tested in test_inference.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from internimage import FlashInternImage, InternImage

MODES = {
    "eval_no_grad": (False, torch.no_grad),
    "eval_inference_mode": (False, torch.inference_mode),
    "eval_grad": (False, contextlib.nullcontext),
    "train_grad": (True, contextlib.nullcontext),
}

VARIANTS = {
    "t_like": dict(),
    "b_like": dict(layer_scale=1e-5, post_norm=True),
    "h_like": dict(res_post_norm=True, center_feature_scale=True, dw_kernel_size=5,
                   use_clip_projector=True, level2_post_norm=True,
                   level2_post_norm_block_ids=[0], meta_dim=8),
}


def small_model(**kwargs) -> InternImage:
    torch.manual_seed(0)
    return InternImage(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=10,
                       drop_path_rate=0.0, **kwargs)


def small_flash_model() -> FlashInternImage:
    """FlashInternImage with L's flags: depthwise offset branch, DCN and fc2 biases."""
    torch.manual_seed(0)
    return FlashInternImage(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8),
                            num_classes=10, drop_path_rate=0.0, layer_scale=1e-5,
                            post_norm=True, dw_kernel_size=3, dcn_output_bias=True,
                            mlp_fc2_bias=True)


def parametrised_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns parameters itself (not through children)."""
    return {name: m for name, m in model.named_modules()
            if next(m.parameters(recurse=False), None) is not None}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_parametrised_module_is_called(variant: str, mode: str) -> None:
    model = small_model(**VARIANTS[variant])
    training, context = MODES[mode]
    model.train(training)
    modules = parametrised_modules(model)
    called: set[str] = set()
    for name, module in modules.items():
        module.register_forward_hook(lambda m, a, o, name=name: called.add(name))
    x = torch.randn(2, 3, 64, 64)
    extra = dict(temporal=torch.randn(2, 4), spatial=torch.randn(2, 3)) if "meta" in str(
        VARIANTS[variant]) else {}
    with context():
        model(x, **extra)
    missing = sorted(set(modules) - called)
    assert not missing, f"{len(missing)} of {len(modules)} never called: {missing[:8]}"
    # among them the ones the issue names
    block = "stages.0.blocks.0."
    for leaf in ("dcn.input_proj", "dcn.dw_conv", "dcn.dw_norm", "dcn.offset", "dcn.mask",
                 "dcn.output_proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"):
        assert block + leaf in called


def _activation_swaps(model: InternImage) -> list[nn.Module]:
    """Replaces every block's MLP and offset-branch activation with a ReLU that records calls."""
    relus = []
    for stage in model.stages:
        for block in stage.blocks:
            block.mlp.act = nn.ReLU()
            block.dcn.dw_act = nn.ReLU()
            relus += [block.mlp.act, block.dcn.dw_act]
    return relus


@pytest.mark.parametrize("mode", list(MODES))
def test_swapped_submodules_take_effect(mode: str) -> None:
    training, context = MODES[mode]
    x = torch.randn(2, 3, 64, 64)
    reference = small_model().train(training)  # no dropout or drop path: deterministic
    swapped = small_model().train(training)
    relus = _activation_swaps(swapped)
    calls = []
    for relu in relus:
        relu.register_forward_hook(lambda m, a, o: calls.append(m))
    # ground truth: a model built with ReLU everywhere in the blocks but the same weights
    built_relu = small_model(act_layer="ReLU").train(training)
    built_relu.load_state_dict(swapped.state_dict())
    # the stem and conv head use act_layer too: give them the GELU of the swapped model
    built_relu.stem.act = nn.GELU()
    built_relu.head.act = nn.GELU()
    with context():
        out_gelu = reference(x)
        out_swapped = swapped(x)
        out_built = built_relu(x)
    assert len(calls) == len(relus)
    assert not torch.allclose(out_swapped, out_gelu)
    torch.testing.assert_close(out_swapped, out_built, rtol=0, atol=0)  # same modules, twice


def test_forward_does_not_depend_on_grad_mode() -> None:
    model = small_model(**VARIANTS["h_like"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        no_grad = model(x)
    with torch.inference_mode():
        inference = model(x)
    with_grad = model(x)
    assert with_grad.requires_grad
    # one program: the same kernels in the same order, so equal bit for bit
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(inference, no_grad, rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_parametrised_module_of_flash_internimage_is_called(mode: str) -> None:
    model = small_flash_model()
    training, context = MODES[mode]
    model.train(training)
    modules = parametrised_modules(model)
    called: set[str] = set()
    for name, module in modules.items():
        module.register_forward_hook(lambda m, a, o, name=name: called.add(name))
    with context():
        model(torch.randn(2, 3, 64, 64))
    missing = sorted(set(modules) - called)
    assert not missing, f"{len(missing)} of {len(modules)} never called: {missing[:8]}"
    block = "stages.0.blocks.0."
    for leaf in ("dcn.value_proj", "dcn.offset_mask_dw", "dcn.offset_mask", "dcn.output_proj",
                 "mlp.fc1", "mlp.fc2", "norm1", "norm2"):
        assert block + leaf in called
