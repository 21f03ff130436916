"""cgroups: one driver interface (base.py), a v1 and a v2 driver, chosen by detect()."""

from .base import CgroupBusy, CgroupDriver, CgroupError, CgroupHandle, CgroupLimits
from .detect import detect, detect_mode

__all__ = ["CgroupBusy", "CgroupDriver", "CgroupError", "CgroupHandle", "CgroupLimits",
           "detect", "detect_mode"]
