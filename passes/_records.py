"""Records the analysis passes leave for the rewriting passes.

They refer to graph nodes **by name**, never by ``fx.Node`` object, so they stay valid when the backend
copies a graph (for ``on_pass_error="fallback"`` and for ICC's two graph variants). Resolve names with
:func:`fxdit.passes._fx_utils.nodes_by_name`.

Where they live: ``gm.meta["fxdit"]`` (see :func:`fxdit.passes._fx_utils.fxdit_meta`) holds
``"attention_sites"`` (list of :class:`AttentionSite`), ``"blocks"`` (list of :class:`BlockInfo`) and
``"token_grid"`` (:class:`TokenGrid` or ``None``, with ``"token_grid_reason"`` saying why when ``None``); each
attention node also carries its site in
``node.meta["fxdit"]["attention"]`` and each linear its :class:`LinearInfo` in ``node.meta["fxdit"]["linear"]``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["AttentionSite", "LinearInfo", "BlockInfo", "TokenGrid", "CarriedTokens", "PassState", "LINEAR_ROLES"]

#: Roles ``find_blocks`` gives to the linear layers of a transformer block.
LINEAR_ROLES = ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out", "modulation", "other")


@dataclass
class AttentionSite:
    """One attention call in the graph.

    Attributes:
        node: name of the node whose value is the attention output (the SDPA call, or the final ``@ v``).
        form: the call form from the table in ``find_attention`` (``"sdpa_positional"``, ``"sdpa_keyword"``,
            ``"unfused"``, ``"unfused_prescaled"``...).
        nodes: names of every node that makes up the site (one for SDPA; the matmul/softmax chain for unfused).
        q, k, v: names of the nodes that feed the attention as q, k, v (layout B, H, S, D).
        mask: names of the mask node or ``None``; ``mask_kind`` is ``"none"``, ``"bool"``, ``"float"`` or ``"flex"``
            (a ``flex_attention`` call: its own score_mod and block mask).
        batch, heads, kv_heads, q_len, kv_len, head_dim: shapes at trace time.
        scale: the softmax scale (``None`` means the default 1/sqrt(head_dim)).
        dropout: dropout probability; ``causal``: the causal flag; ``enable_gqa``: SDPA's GQA flag.
        dtype: dtype name of q.
        image_span: ``(start, stop)`` of the image/video tokens along the sequence, when known.
        text_span: ``(start, stop)`` of the non-image tokens (text, and learned/register tokens beside it), when
            the sequence joins them to the image tokens in one run; ``None`` when they lie on both sides.
        global_spans: every run of non-image tokens (the tokens GRAT keeps global), in sequence order (of the keys
            for ``"joint_kv"`` sites).
        kv_image_span: for ``"joint_kv"`` sites, ``(start, stop)`` of the image tokens among the keys.
        cross: True when keys come from another sequence than queries (image→text cross-attention).
        block: index of the transformer block the site lives in (``None`` when outside any block).
        span_source: how the spans were found (``"cat"``: joint text+image sequence, ``"self"``: image tokens
            only, ``"cross"``: image queries, keys from another sequence, ``"text"``: text tokens only (a text
            refiner; ``image_span`` is ``None``), ``"joint_kv"``: image queries, keys of the same image tokens
            joined to text/learned tokens, ``"ragged"``: each sample of the batch holds its image tokens at
            other positions (per-sample caption lengths), ``"unknown"``).
    """

    node: str
    form: str
    nodes: tuple[str, ...]
    q: str
    k: str
    v: str
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    scale: float | None = None
    mask: str | None = None
    mask_kind: str = "none"
    dropout: float = 0.0
    causal: bool = False
    enable_gqa: bool = False
    dtype: str = "float32"
    layout: str = "BHSD"
    image_span: tuple[int, int] | None = None
    text_span: tuple[int, int] | None = None
    global_spans: tuple[tuple[int, int], ...] = ()
    kv_image_span: tuple[int, int] | None = None
    cross: bool = False
    block: int | None = None
    span_source: str = "unknown"

    @property
    def text_first(self) -> bool | None:
        if self.text_span is None or self.image_span is None:
            return None
        return self.text_span[0] < self.image_span[0]


@dataclass
class LinearInfo:
    """One linear layer call (``torch._C._nn.linear`` / ``F.linear``) inside a transformer block.

    Attributes:
        node: name of the linear call node.
        module: qualified module path, e.g. ``"transformer_blocks.0.attn1.to_q"`` (``""`` if unknown).
        role: one of :data:`LINEAR_ROLES`.
        block: index of the block.
        in_features, out_features: weight shape.
        weight, bias: names of the nodes holding the weight and bias (``bias`` may be ``None``).
        tokens: tokens per sample in the input (product of the non-batch, non-channel dims), 1 for vectors.
        stream: ``"image"`` or ``"text"`` for dual-stream blocks (SD3/Flux context projections), else ``"joint"``.
        adapters: names of the low-rank adapter linears (unfused LoRA ``lora_A``/``lora_B`` pairs) whose scaled
            product is added to this linear's output; the linear's role is that of the sum.
        adapter_of: for an adapter linear, the name of the linear it adapts (its role is then ``"other"``).
    """

    node: str
    module: str
    role: str
    block: int
    in_features: int
    out_features: int
    weight: str
    bias: str | None
    tokens: int
    stream: str = "joint"
    adapters: tuple[str, ...] = ()
    adapter_of: str | None = None


@dataclass
class BlockInfo:
    """One transformer block.

    Attributes:
        index: 0-based position among the blocks (in graph order).
        path: qualified module path of the block, e.g. ``"transformer_blocks.3"``.
        linears: its linear layers, in graph order.
        tokens: image/video token count per sample flowing through the block.
        hidden: hidden size.
    """

    index: int
    path: str
    linears: list[LinearInfo] = field(default_factory=list)
    tokens: int = 0
    hidden: int = 0

    def by_role(self, role: str) -> list[LinearInfo]:
        return [lin for lin in self.linears if lin.role == role]


@dataclass
class TokenGrid:
    """The image/video token grid as the graph shows it.

    Attributes:
        shape: ``(T, H, W)``; ``T == 1`` for images.
        source: ``"conv2d"``, ``"conv3d"``, ``"unfold"``, ``"unpatchify"`` or ``"option"``.
        patch_node: name of the node whose value is the token sequence (B, N, C) right after the patch
            embedding (before positional embeddings are added), when found.
        unpatch_node: name of the node that starts the unpatchify reshape, when found.
        patch: patch size in pixels/latents per axis, when known.
        frames_in_batch: ``T`` when a per-frame (2-D) patch embedding runs on the frames folded into the batch
            and the frames join the token sequence later (``(B·T, N, C) -> (B, T·N, C)``); ``None`` otherwise.
    """

    shape: tuple[int, int, int]
    source: str
    patch_node: str | None = None
    unpatch_node: str | None = None
    patch: tuple[int, ...] | None = None
    frames_in_batch: int | None = None

    @property
    def tokens(self) -> int:
        t, h, w = self.shape
        return t * h * w

    @property
    def is_video(self) -> bool:
        return self.shape[0] > 1


@dataclass(frozen=True)
class CarriedTokens:
    """The token layout of a tensor one graph hands to the next across a graph break.

    ``find_blocks`` records it for the outputs of a graph whose tokens it understands
    (``gm.meta["fxdit"]["output_tokens"]``: output index → record); the backend tags those output tensors when the
    graph runs and, when a later graph of the model receives one as an input, puts the record in that graph's
    ``gm.meta["fxdit"]["carried_tokens"]`` (placeholder name → record), where :func:`token_streams` seeds it.

    Attributes:
        dim: the token dimension.
        segments: ``((stream, length), ...)`` along it (see :class:`~fxdit.passes._dataflow.Layout`).
        grid: the token grid ``(T, H, W)`` of the image segment.
    """

    dim: int
    segments: tuple[tuple[str, int], ...]
    grid: tuple[int, int, int]


@dataclass
class PassState(MutableMapping[str, Any]):
    """fxdit's typed per-graph state (``gm.meta["fxdit"]``): every record a pass or the backend leaves for later.

    Each field is declared here with its type and its writer; reading or writing a name that is not a field raises
    ``KeyError`` (no string key can be mistyped silently). The mapping interface (``state["blocks"]``,
    ``state.get(...)``, ``in``) is kept for the passes: every field reads as its value (``None`` when unset), and
    ``in`` / iteration see the fields that are not ``None``. The
    pipeline records the fields each pass reads and writes (:attr:`reads`, :attr:`writes`) and checks them against
    what the pass declares (:func:`fxdit.passes._base.declares`).
    """

    #: find_attention: the attention sites, and the block module paths their ``block`` index refers to.
    attention_sites: list[AttentionSite] | None = None
    block_paths: list[str] | None = None
    #: find_blocks: transformer blocks with their linears, the token grid (or why there is none), and the graph
    #: outputs that carry tokens to the next graph.
    blocks: list[BlockInfo] | None = None
    token_grid: TokenGrid | None = None
    token_grid_reason: str | None = None
    output_tokens: dict[int, CarriedTokens] | None = None
    #: backend, before the passes: position ids of packed inputs; layouts carried from an earlier graph.
    position_ids: dict[str, Any] | None = None
    carried_tokens: dict[str, CarriedTokens] | None = None
    #: lift_constant: tensors lifted to extra graph inputs (name -> tensor), appended to every call.
    constants: dict[str, Any] | None = None
    #: shard_tokens: the graph runs on a band of tokens per rank.
    sharded: bool | None = None
    #: plan_cache: the ICC plan and the factor tensors; the variant passes' records; cache memory.
    cache_plan: dict[str, Any] | None = None
    cache_factors: Any = None
    cache_recorded: dict[str, Any] | None = None
    cache_inserted: dict[str, Any] | None = None
    cache_bytes: int | None = None
    #: runtime: figures the backend copies into the graph's summary.
    summary_cache_bytes: int | None = None
    summary_cache_linears: int | None = None
    summary_cache_mode: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fields", frozenset(f.name for f in fields(self)))
        object.__setattr__(self, "reads", set())
        object.__setattr__(self, "writes", set())

    def _check(self, key: str) -> None:
        if key not in self._fields:  # type: ignore[attr-defined]
            raise KeyError(f"{key!r} is not a field of PassState (declare it in passes/_records.py)")

    def __getitem__(self, key: str) -> Any:
        self._check(key)
        self.reads.add(key)  # type: ignore[attr-defined]
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key)
        self.writes.add(key)  # type: ignore[attr-defined]
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._check(key)
        self.writes.add(key)  # type: ignore[attr-defined]
        setattr(self, key, None)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        self._check(key)
        self.reads.add(key)  # type: ignore[attr-defined]
        return getattr(self, key) is not None

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in fields(self) if getattr(self, f.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, key: str, default: Any = None) -> Any:
        self._check(key)
        self.reads.add(key)  # type: ignore[attr-defined]
        value = getattr(self, key)
        return default if value is None else value

    def copy_for(self) -> PassState:
        """A copy for another graph module: records deep-copied, lifted tensors and factor tensors shared."""
        new = PassState()
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "constants":
                value = dict(value)  # tensors are shared, the mapping is not
            else:
                value = copy.deepcopy(value)
            setattr(new, f.name, value)
        return new
