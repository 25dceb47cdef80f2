"""InternImage (CVPR 2023) and its DCNv3 operator for PyTorch and timm."""

from internimage.ops import dcnv3, dcnv3_reference

__version__ = "0.1.0"
__all__ = ["dcnv3", "dcnv3_reference", "__version__"]
