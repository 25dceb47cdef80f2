"""``internimage models``: the variants and pretrained tags with params and FLOPs."""

from __future__ import annotations

import argparse
import json

from internimage.cli.errors import CommandError
from internimage.table import format_table

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the variants and pretrained tags with params and FLOPs",
        description="Table of the registered InternImage and FlashInternImage variants and "
                    "pretrained tags: parameters, GMACs/GFLOPs at the tag's input size "
                    "(DCNv3 / DCNv4 op included; counted on the meta device), input size, "
                    "stage channels, classes.")
    p.add_argument("--filter", default=None, metavar="PATTERN",
                   help="only the models and tags whose name starts with PATTERN "
                        "(internimage_t: internimage_t and its tags, not flash_internimage_t), "
                        "or matches it as a glob when it holds * ? or [ (e.g. '*_t*')")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> int:
    """Variants, pretrained tags, params, FLOPs, input size, channels."""
    import timm

    from internimage.files import atomic_write_text
    from internimage.flops import model_complexity
    from internimage.progress import progress

    families = ["internimage_*", "flash_internimage_*"]
    names = timm.list_models(families, pretrained=True, include_tags=True)
    untagged = [n for n in timm.list_models(families)
                if not any(t.split(".")[0] == n for t in names)]
    entries = sorted(names + untagged, key=_variant_order)
    if args.filter:
        entries = [e for e in entries if matches(e, args.filter)]
        if not entries:
            raise CommandError(f"--filter: no InternImage or FlashInternImage model or tag "
                               f"matches {args.filter!r} (a name prefix, or a glob with * ? "
                               "or [)")
    rows, records = [], []
    bar = progress(len(entries), "counting parameters and FLOPs", unit="model")
    for entry in entries:
        bar.set_postfix_str(entry)
        arch, _, tag = entry.partition(".")
        cfg = timm.models.get_pretrained_cfg(entry)
        record = model_complexity(entry, num_classes=cfg.num_classes)
        record.update(arch=arch, tag=tag or "-", hf_hub_id=cfg.hf_hub_id,
                      hf_hub_filename=cfg.hf_hub_filename)
        records.append(record)
        rows.append([
            arch, tag or "-", f"{record['params'] / 1e6:.2f}", f"{record['macs'] / 1e9:.2f}",
            f"{record['flops'] / 1e9:.2f}", "x".join(map(str, record["input_size"][1:])),
            "-".join(map(str, record["stage_channels"])), record["num_classes"],
            cfg.hf_hub_filename or "-",
        ])
        bar.update(1)
    bar.close()
    headers = ["model", "tag", "params (M)", "GMACs", "GFLOPs", "input", "stage channels",
               "classes", "original weights file"]
    print(format_table(headers, rows, align="llrrrllrl"))
    print("\nGFLOPs: torch.utils.flop_counter (1 multiply-add = 2 FLOPs) with the DCNv3 / "
          "DCNv4 op counted as 5 MACs per sampling point and channel; the papers' 'FLOPs' are "
          "GMACs. Counted on the meta device at each tag's input size.")
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
    return 0


def matches(name: str, pattern: str) -> bool:
    """``--filter``: ``name`` (``arch`` or ``arch.tag``) starts with ``pattern``, or matches it
    as a glob (:mod:`fnmatch`) when it holds ``*``, ``?`` or ``[``."""
    from fnmatch import fnmatchcase

    if any(char in pattern for char in "*?["):
        return fnmatchcase(name, pattern)
    return name.startswith(pattern)


def _variant_order(name: str) -> tuple[bool, int, str]:
    """InternImage first, then FlashInternImage; each from T to G."""
    order = ["t", "s", "b", "l", "xl", "h", "g"]
    arch = name.split(".")[0]
    flash = arch.startswith("flash_")
    size = arch.removeprefix("flash_").removeprefix("internimage_").removesuffix("_meta")
    return (flash, order.index(size) if size in order else len(order), name)  # h_meta after h
