"""Garment parsing: which pixels of a photo are which garment group, and one box per garment.

    from vestis.detect import load_parser
    parser = load_parser()                      # the shipped "parser-lite0"
    for garment in parser.parse("street.jpg"):
        print(garment.group, garment.box, garment.score)
"""

from .boxes import BoxRules, Region, regions_from_labels
from .groups import CCP_LABEL_GROUPS, GARMENT_GROUPS, GROUPS, label_lookup
from .landmarks import LANDMARKS, Landmarks, mask_landmarks
from .metrics import ParsingMetrics, confusion, format_metrics, metrics_from_confusion
from .parser import DEFAULT_PARSER, Garment, GarmentParser, Parsing, draw_garments, load_parser

__all__ = [
    "BoxRules",
    "CCP_LABEL_GROUPS",
    "DEFAULT_PARSER",
    "GARMENT_GROUPS",
    "GROUPS",
    "Garment",
    "LANDMARKS",
    "Landmarks",
    "GarmentParser",
    "Parsing",
    "ParsingMetrics",
    "Region",
    "confusion",
    "draw_garments",
    "format_metrics",
    "label_lookup",
    "load_parser",
    "mask_landmarks",
    "metrics_from_confusion",
    "regions_from_labels",
]
