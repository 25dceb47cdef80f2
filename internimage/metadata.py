"""iNaturalist metadata: the metadata head of the original iNaturalist InternImage-H
(``intern_image_meta_former``) and :func:`encode_inat_metadata`, which turns month, hour,
latitude and longitude into the head's ``temporal`` ``(N, 4)`` and ``spatial`` ``(N, 3)``
inputs."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from internimage.dcnv3 import LN_EPS

__all__ = ["MetadataResidualBlock", "MetadataEncoder", "MetadataHead", "encode_inat_metadata"]

META_LN_EPS = 1e-5  # the metadata encoders' LayerNorms use PyTorch's default eps

# Widths of the iNaturalist metadata vectors (see encode_inat_metadata).
TEMPORAL_FEATURES = 4
SPATIAL_FEATURES = 3


class MetadataResidualBlock(nn.Module):
    """Residual MLP of the metadata encoders (the original ``MetaEncoder``).

    ``(..., dim)`` -> ``(..., dim)``: ``x + norm2(act(fc2(norm1(act(fc1(x))))))`` with ReLU
    and LayerNorms of eps 1e-5 (PyTorch's default, as in the original).
    """

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, dim, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=META_LN_EPS, **dd)
        self.fc2 = nn.Linear(dim, dim, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=META_LN_EPS, **dd)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(self.act(self.fc1(x)))
        return x + self.norm2(self.act(self.fc2(y)))


class MetadataEncoder(nn.Module):
    """One metadata branch: Linear(in_features, dim) -> ReLU -> LN -> residual MLP.

    ``(N, in_features)`` -> ``(N, dim)`` (the original ``meta_head_1`` / ``meta_head_2``; the
    residual MLP is :class:`MetadataResidualBlock`).
    """

    def __init__(self, in_features: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.proj = nn.Linear(in_features, dim, **dd)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(dim, eps=META_LN_EPS, **dd)
        self.block = MetadataResidualBlock(dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.norm(self.act(self.proj(x))))


class MetadataHead(nn.Module):
    """Metadata classifier of the original iNaturalist model (``intern_image_meta_former``).

    ``temporal`` ``(N, 4)`` and ``spatial`` ``(N, 3)`` (see :func:`encode_inat_metadata`) are
    encoded to ``(N, dim)`` each by :class:`MetadataEncoder`; the concatenation ``(N, 2 dim)``
    goes through LN (eps 1e-6) and ``fc`` to ``(N, num_classes)`` logits, which the model adds
    to the image logits. With ``num_classes == 0`` ``fc`` is an Identity and the model skips
    the metadata (``forward`` then returns the normalised ``(N, 2 dim)`` embedding).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int = 64,
        temporal_features: int = TEMPORAL_FEATURES,
        spatial_features: int = SPATIAL_FEATURES,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_classes = num_classes
        self.temporal = MetadataEncoder(temporal_features, dim, **dd)
        self.spatial = MetadataEncoder(spatial_features, dim, **dd)
        self.norm = nn.LayerNorm(2 * dim, eps=LN_EPS, **dd)
        self.fc = self._make_fc(num_classes, **dd)

    def _make_fc(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes > 0:
            return nn.Linear(2 * self.dim, num_classes, device=device, dtype=dtype)
        return nn.Identity()

    def reset(self, num_classes: int) -> None:
        """New metadata classifier of ``num_classes`` outputs (Identity for 0), initialised
        like the model's Linears (trunc-normal 0.02 weight, zero bias)."""
        ref = self.norm.weight
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes, device=ref.device, dtype=ref.dtype)
        if isinstance(self.fc, nn.Linear):
            trunc_normal_(self.fc.weight, std=0.02)
            nn.init.zeros_(self.fc.bias)
        self.train(self.training)

    def forward(self, temporal: Tensor, spatial: Tensor) -> Tensor:
        """``(N, 4)``, ``(N, 3)`` -> ``(N, num_classes)`` (``(N, 2 dim)`` without classifier)."""
        meta = torch.cat([self.temporal(temporal), self.spatial(spatial)], dim=-1)
        return self.fc(self.norm(meta))



def _metadata_values(name: str, value: Any, low: float, high: float) -> Tensor | None:
    """``value`` as a float64 tensor of 0 or 1 dims (NaN for missing entries), or None."""
    if value is None:
        return None
    kinds = "a number, a sequence, an array or a tensor"
    if isinstance(value, Tensor):
        values = value.detach().to("cpu", torch.float64)
    elif isinstance(value, bool | str):
        raise TypeError(f"{name} must be {kinds}, got {value!r}")
    elif isinstance(value, numbers.Real):
        values = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, Sequence):
        bad = [v for v in value if v is not None and (
            isinstance(v, bool) or not isinstance(v, numbers.Real))]
        if bad:
            raise TypeError(f"{name} entries must be numbers or None, got {bad[0]!r}")
        values = torch.tensor([float("nan") if v is None else float(v) for v in value],
                              dtype=torch.float64)
    elif hasattr(value, "__array__"):  # numpy arrays and scalars
        try:
            values = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be numeric, got an array of {value.dtype}") from error
    else:
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
    if values.dim() > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {list(values.shape)}")
    known = values[~values.isnan()]
    if known.numel() and (known.min() < low or known.max() > high):
        raise ValueError(
            f"{name} must lie in [{low:g}, {high:g}] (None/NaN for missing), got values in "
            f"[{known.min().item():g}, {known.max().item():g}]"
        )
    return values


def encode_inat_metadata(
    month: Any = None,
    hour: Any = None,
    latitude: Any = None,
    longitude: Any = None,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """iNaturalist metadata vectors for :class:`MetadataHead`: ``(temporal, spatial)``.

    * ``temporal`` ``(N, 4)``: ``[sin(2 pi month / 12), cos(2 pi month / 12),
      sin(2 pi hour / 24), cos(2 pi hour / 24)]``, month 1..12, hour of the day 0..24
      (fractions allowed; 24 is 0); a missing month or hour gives zeros in its two columns;
    * ``spatial`` ``(N, 3)``: ``[cos(lat) cos(lon), cos(lat) sin(lon), sin(lat)]``, the unit
      vector of the position on the sphere, from ``latitude`` in [-90, 90] and ``longitude``
      in [-180, 180] **degrees**; zeros when either is missing.

    This is the MetaFormer encoding (``get_temporal_info`` / ``get_spatial_info`` of
    dqshuai/MetaFormer's iNaturalist dataset, which feeds ``[temporal, spatial]`` split 4 + 3
    to the same kind of metadata head), zeros standing for missing metadata. The InternImage
    repository publishes the iNat18 model and config but no iNat data pipeline, so that it
    used exactly this encoding is inferred, not verified. One difference: MetaFormer also
    treats a latitude or longitude of exactly 0 as missing (a truthiness test); here only
    None / NaN are missing.

    Each argument is None (missing for all), a number (the same for every sample), or a
    sequence / 1-D tensor of length N with None or NaN for missing entries. N is the common
    length of the 1-D arguments, else ``batch_size`` (default 1). Returns ``dtype`` tensors
    on ``device``. ValueError for values out of range or lengths that disagree; TypeError
    for non-numeric values.
    """
    values = {
        "month": _metadata_values("month", month, 1, 12),
        "hour": _metadata_values("hour", hour, 0, 24),
        "latitude": _metadata_values("latitude", latitude, -90, 90),
        "longitude": _metadata_values("longitude", longitude, -180, 180),
    }
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    lengths = {k: v.shape[0] for k, v in values.items() if v is not None and v.dim() == 1}
    sizes = set(lengths.values()) | ({batch_size} if batch_size is not None else set())
    if len(sizes) > 1:
        raise ValueError(
            "month, hour, latitude and longitude must have the same length (and match "
            f"batch_size={batch_size}), got lengths {lengths}"
        )
    n = sizes.pop() if sizes else 1
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    month_v, hour_v, lat_v, lon_v = (
        nan if v is None else v.expand(n) for v in values.values()
    )

    def circle(v: Tensor, period: float) -> Tensor:
        angle = (2 * torch.pi / period) * v
        pair = torch.stack([angle.sin(), angle.cos()], dim=-1)
        return pair.masked_fill(v.isnan()[:, None], 0.0)

    temporal = torch.cat([circle(month_v, 12.0), circle(hour_v, 24.0)], dim=-1)
    lat, lon = torch.deg2rad(lat_v), torch.deg2rad(lon_v)
    spatial = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)
    spatial = spatial.masked_fill((lat_v.isnan() | lon_v.isnan())[:, None], 0.0)
    return temporal.to(device=device, dtype=dtype), spatial.to(device=device, dtype=dtype)
