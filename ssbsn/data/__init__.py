"""Data: image folders, paired evaluation sets (:mod:`.pairs`), tiling (:mod:`.tiles`), SIDD (Medium sRGB, validation/benchmark blocks, submissions), DND
(images, bounding boxes, bundled submissions), and random crops with flips/rotations."""
from .dnd import DNDBoxes, read_dnd_boxes, read_dnd_crop, write_dnd_bundle
from .folder import list_images, paired_images
from .pairs import open_pairs
from .patches import ArraySource, FileSource, PatchDataset, dihedral, open_training_source
from .sidd import (SIDD_SRGB_BLOCKS, load_sidd_blocks, scan_sidd_medium,
                   write_sidd_submission)
from .tiles import tile_origins, write_tiles

__all__ = [
    "ArraySource", "DNDBoxes", "FileSource", "PatchDataset", "SIDD_SRGB_BLOCKS", "dihedral",
    "list_images", "load_sidd_blocks", "open_pairs", "open_training_source", "paired_images",
    "read_dnd_boxes", "read_dnd_crop", "scan_sidd_medium", "write_dnd_bundle",
    "tile_origins", "write_sidd_submission", "write_tiles",
]
