"""Deprecated alias of :mod:`ssbsn.images` (this name shadowed the ``imageio`` package).
Import from ``ssbsn.images``; this module goes once nothing imports it."""
from .images import *  # noqa: F401,F403
from .images import (ICC_TAG, IMAGE_SUFFIXES, MIN_SIDE, ORIENTATION_TAG,  # noqa: F401
                     TIFF_SUFFIXES, ImageError)
