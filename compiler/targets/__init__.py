"""Targets: the catalog of devices (`catalog`), what a target does (`target`: its lowering, its
device for the cost model, its price of a graph, the accelerator fitted to its part), the cost
model's figures measured on this machine (`calibration`) and the backends that build for a
target (`backends`)."""

from .catalog import DEVICE_FIELDS, EXECUTORS, KINDS, SYNTHESIS_FIELDS, get_target, load_catalog
from .target import (ARRAY_SIZES, MARGIN, Part, Target, candidates, cycle_model, derive_accel_config, fits,
                     price_all, scaled_config)

__all__ = ["ARRAY_SIZES", "DEVICE_FIELDS", "EXECUTORS", "KINDS", "MARGIN", "SYNTHESIS_FIELDS", "Part", "Target",
           "candidates", "cycle_model", "derive_accel_config", "fits", "get_target", "load_catalog", "price_all",
           "scaled_config"]
