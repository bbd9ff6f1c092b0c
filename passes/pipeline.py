"""The pass pipeline: fxdit's graph passes, one per module, each ``verb_object(gm, cfg) -> PassReport``.

``PIPELINE`` is the order the backend runs them in. Analysis passes (``find_*``) rewrite nothing; they
leave records in ``gm.meta["fxdit"]`` for the rewriting passes that follow.
"""

from __future__ import annotations

from fxdit.passes._base import PassReport
from fxdit.passes.find_attention import find_attention
from fxdit.passes.find_blocks import find_blocks
from fxdit.passes.plan_cache import plan_cache
from fxdit.passes.rewrite_grouped_attention import rewrite_grouped_attention
from fxdit.passes.shard_tokens import shard_tokens

__all__ = ["PIPELINE", "PassReport", "find_attention", "find_blocks", "rewrite_grouped_attention", "shard_tokens",
           "plan_cache"]

#: The passes the backend runs, in order, on every graph Dynamo hands it.
PIPELINE = (find_attention, find_blocks, rewrite_grouped_attention, shard_tokens, plan_cache)
