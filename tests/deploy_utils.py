"""Small models and helpers shared by the deployment tests (test_deploy*.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from internimage import DCNv3, InternImage

#: A conv-head (T/S/B/L/XL style) model, as small as the architecture allows.
CONV_KWARGS = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], num_classes=10)

#: An H-style model: clip-projector head, centre-feature scale, level-2 post norms,
#: res-post-norm, 5x5 depthwise offset branch.
CLIP_KWARGS = dict(
    channels=16, depths=[1, 1, 3, 1], groups=[1, 2, 4, 8], use_clip_projector=True,
    center_feature_scale=True, level2_post_norm=True, level2_post_norm_block_ids=[0, 2],
    res_post_norm=True, dw_kernel_size=5, num_classes=10,
)

MODEL_KWARGS = {"conv": CONV_KWARGS, "clip": CLIP_KWARGS}


def randomize_(model: nn.Module, seed: int = 0, offset_std: float = 0.3) -> nn.Module:
    """Perturbs every parameter (seeded) so the deformable sampling is exercised: the
    default init has zero offset/mask projections, i.e. a fixed 3x3 average. Offsets of a
    few tenths to a few pixels give fractional and out-of-image samples."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = offset_std if ".dcn.offset." in name else 0.05
            noise = torch.randn(param.shape, generator=generator) * std
            param.add_(noise.to(param.device, param.dtype))
    return model


def make_model(kind: str, seed: int = 0, **overrides) -> InternImage:
    """A randomised tiny model in eval mode: ``kind`` is 'conv' or 'clip'."""
    torch.manual_seed(seed)
    kwargs = dict(MODEL_KWARGS[kind], drop_path_rate=0.0)
    kwargs.update(overrides)
    return randomize_(InternImage(**kwargs), seed).eval()


def make_input(batch: int, size: int | tuple[int, int] = 64, seed: int = 1) -> Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def dcn_modules(model: nn.Module) -> list[DCNv3]:
    return [m for m in model.modules() if isinstance(m, DCNv3)]


def forward_backward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and parameter gradients of a fixed weighted sum of the output."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    weights = torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype, device=out.device)
    (out * weights).sum().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return out.detach(), x.grad.detach(), grads


def model_state(model: nn.Module) -> tuple[list[bool], list[str], dict[str, Tensor]]:
    """Everything an export could change: training flags, core ops, parameters and buffers."""
    return (
        [m.training for m in model.modules()],
        [m.core_op for m in dcn_modules(model)],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def assert_same_state(before, after) -> None:
    assert before[0] == after[0], "training flags changed"
    assert before[1] == after[1], "core_op of the DCNv3 modules changed"
    assert before[2].keys() == after[2].keys()
    for key in before[2]:
        assert torch.equal(before[2][key], after[2][key]), f"{key} changed"
