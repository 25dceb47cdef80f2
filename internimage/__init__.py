"""InternImage (CVPR 2023) and FlashInternImage (CVPR 2024), with their DCNv3 and DCNv4
operators, for PyTorch and timm.

Importing the package registers the timm models ``internimage_t/s/b/l/xl/h/g``,
``internimage_h_meta`` (H with the iNaturalist metadata head) and
``flash_internimage_t/s/b/l``. The functional
ops live in :mod:`internimage.ops` (``internimage.ops.dcnv3``, ``internimage.ops.dcnv4``);
``internimage.dcnv3`` and ``internimage.dcnv4`` are the module files holding the
:class:`DCNv3` layer of InternImage and the :class:`DCNv4` layer of FlashInternImage.
"""

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

__version__ = "0.1.0"
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
