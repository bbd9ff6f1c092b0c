"""find_blocks: placeholder until the analysis lands (returns an empty report)."""
from __future__ import annotations
import torch.fx as fx
from fxdit.passes._base import PassReport
from fxdit.passes._fx_utils import fxdit_meta

def find_blocks(gm: fx.GraphModule, cfg=None) -> PassReport:
    fxdit_meta(gm)["blocks"] = []
    fxdit_meta(gm)["token_grid"] = None
    return PassReport("find_blocks")
