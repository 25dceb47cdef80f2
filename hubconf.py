"""torch.hub entry points: ``torch.hub.load("<owner>/<repo>", "internimage_t", pretrained=False)``
from a checkout (or ``torch.hub.load(path, ..., source="local")``), for every
``internimage_*`` and ``flash_internimage_*`` variant.

Each entry point is the timm constructor of the same name, so it takes timm's keywords too
(``num_classes``, ``features_only``, ``output_stride``, ``pretrained_cfg_overlay``, ...).
torch.hub imports this file with the repository on ``sys.path``, so the package's compiled
extension is used when it was built in place (``pip install --no-build-isolation -e .``);
otherwise the pure-PyTorch DCNv3 / DCNv4 reference runs, with a warning.
"""

dependencies = ["torch", "timm"]

from internimage.flash_internimage import (  # noqa: E402,F401  (the entry points)
    flash_internimage_b,
    flash_internimage_l,
    flash_internimage_s,
    flash_internimage_t,
)
from internimage.internimage import (  # noqa: E402,F401
    internimage_b,
    internimage_g,
    internimage_h,
    internimage_h_meta,
    internimage_l,
    internimage_s,
    internimage_t,
    internimage_xl,
)
