"""Network building blocks: backbones, pooling, whitening (and the re-ranking pieces)."""
from irkit.nn.pooling import (MAC, RMAC, SPoC, GeM, RegionProjection, gem, mac, pool_regions,
                              regional_descriptor, regional_gem, rmac, rmac_regions, spoc)
from irkit.nn.whitening import (Whitening, WhiteningParams, apply_whitening, learn_lw,
                                learn_pca_whitening, load_whitening, save_whitening)

__all__ = ["GeM", "MAC", "RMAC", "RegionProjection", "SPoC", "Whitening", "WhiteningParams",
           "apply_whitening", "gem", "learn_lw", "learn_pca_whitening", "load_whitening", "mac",
           "pool_regions", "regional_descriptor", "regional_gem", "rmac", "rmac_regions",
           "save_whitening", "spoc"]
