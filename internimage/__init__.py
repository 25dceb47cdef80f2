"""InternImage (CVPR 2023) and FlashInternImage (CVPR 2024), with their DCNv3 and DCNv4
operators, for PyTorch and timm.

Importing the package registers the timm models ``internimage_t/s/b/l/xl/h/g``,
``internimage_h_meta`` (H with the iNaturalist metadata head) and
``flash_internimage_t/s/b/l``, and the ops ``torch.ops.internimage.*``: at once when timm and
torch are imported, else as soon as they are (see :mod:`internimage.registration`). The
public names below are imported on first use. The functional
ops live in :mod:`internimage.ops` (``internimage.ops.dcnv3``, ``internimage.ops.dcnv4``);
``internimage.dcnv3`` and ``internimage.dcnv4`` are the module files holding the
:class:`DCNv3` layer of InternImage and the :class:`DCNv4` layer of FlashInternImage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from internimage.registration import register

__version__ = "0.1.0"

#: The public names, each imported from its module on first use (PEP 562), so that
#: ``import internimage`` stays cheap (the ``internimage`` command's ``--help`` and
#: ``--version`` import neither timm nor the models).
_EXPORTS = {
    "DCNv3": "internimage.dcnv3",
    "DCNv4": "internimage.dcnv4",
    "InternImage": "internimage.internimage",
    "FlashInternImage": "internimage.flash_internimage",
    "MetadataHead": "internimage.metadata",
    "encode_inat_metadata": "internimage.metadata",
    "checkpoint_filter_fn": "internimage.checkpoint_filter",
    "dcn_offset_param_names": "internimage.network",
    "imagenet22k_to_1k_indices": "internimage.checkpoint_filter",
    "convert_checkpoint": "internimage.checkpoint",
    "load_original_checkpoint": "internimage.checkpoint",
    "export_onnx": "internimage.export",
    "optimize_for_inference": "internimage.inference",
    "param_groups_layer_decay": "internimage.layer_decay",
}
__all__ = [
    "DCNv3",
    "DCNv4",
    "InternImage",
    "FlashInternImage",
    "MetadataHead",
    "encode_inat_metadata",
    "checkpoint_filter_fn",
    "dcn_offset_param_names",
    "imagenet22k_to_1k_indices",
    "convert_checkpoint",
    "load_original_checkpoint",
    "export_onnx",
    "optimize_for_inference",
    "param_groups_layer_decay",
    "__version__",
]

if TYPE_CHECKING:  # what static analysers and IDEs see
    from internimage.checkpoint import convert_checkpoint, load_original_checkpoint
    from internimage.checkpoint_filter import checkpoint_filter_fn, imagenet22k_to_1k_indices
    from internimage.dcnv3 import DCNv3
    from internimage.dcnv4 import DCNv4
    from internimage.export import export_onnx
    from internimage.flash_internimage import FlashInternImage
    from internimage.inference import optimize_for_inference
    from internimage.internimage import InternImage
    from internimage.layer_decay import param_groups_layer_decay
    from internimage.metadata import MetadataHead, encode_inat_metadata
    from internimage.network import dcn_offset_param_names


def __getattr__(name: str) -> Any:
    """A public name (imported from its module), or a submodule (``internimage.ops``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


register()
