"""Where the parameters live: logical axis names per weight, and rules mapping them to a mesh.

Kept apart from the model math: `model.py` never mentions devices. Each weight dimension gets a
logical name; a rules table maps logical names to mesh axes (or None = replicated). The default
rules are tensor parallelism over a mesh axis "tp": attention heads, MLP width and vocabulary are
split; the hidden ("embed") dimension is replicated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwen_jax.config import QwenConfig
from qwen_jax.layout import BlockedWeight
from qwen_jax.model import KVCache, LayerParams, Params
from qwen_jax.quantize import Int8Weight

# Fused projection outputs (heads * head_dim) are named by their head axis: splitting them over
# devices by whole heads keeps every head's head_dim on one device.
_LAYER_AXES = {
    "input_norm": ("embed",),
    "q_proj": ("heads", "embed"),
    "q_bias": ("heads",),
    "k_proj": ("kv_heads", "embed"),
    "k_bias": ("kv_heads",),
    "v_proj": ("kv_heads", "embed"),
    "v_bias": ("kv_heads",),
    "o_proj": ("embed", "heads"),
    "post_norm": ("embed",),
    "gate_proj": ("mlp", "embed"),
    "up_proj": ("mlp", "embed"),
    "down_proj": ("embed", "mlp"),
}

DEFAULT_RULES: dict[str, str | None] = {
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "vocab": "tp",
    "batch": None,
    "sequence": None,
}


def make_mesh(tp: int | None = None) -> Mesh:
    """A 1-D "tp" mesh over `tp` devices (default: all). Axes are Auto (compiler-propagated)
    sharding: the model code carries no sharding annotations."""
    n = len(jax.devices()) if tp is None else tp
    return jax.make_mesh((n,), ("tp",), axis_types=(AxisType.Auto,))


def param_logical_axes(cfg: QwenConfig) -> Params:
    """A Params-shaped pytree whose leaves are tuples of logical axis names, one per dimension."""
    return _param_axes(cfg.num_hidden_layers, tied=cfg.tie_word_embeddings)


def _param_axes(num_layers: int, tied: bool) -> Params:
    layer = LayerParams(**_LAYER_AXES)
    return Params(
        embed=("vocab", "embed"),
        layers=[layer for _ in range(num_layers)],
        final_norm=("embed",),
        lm_head=None if tied else ("vocab", "embed"),
    )


def _axes_like(axes: tuple[str, ...], w):
    """A weight's logical axes in the shape of its pytree: an int8 weight's leading column-block
    axis is never split; each block of a BlockedWeight takes the whole weight's axes."""
    if isinstance(w, Int8Weight):
        return Int8Weight(q=("blocks", *axes), scale=axes[:1])
    if isinstance(w, BlockedWeight):
        return BlockedWeight(blocks=[axes] * len(w.blocks), n_in=w.n_in)
    return axes


def cache_logical_axes(num_layers: int) -> KVCache:
    """Logical axes of a KV cache of `num_layers` layers: kv heads split as k_proj's are."""
    axes = ("batch", "sequence", "kv_heads", "head_dim")
    return KVCache(k=[axes] * num_layers, v=[axes] * num_layers)


def _is_axes(x: object) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def logical_to_spec(
    axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules: Mapping[str, str | None]
) -> PartitionSpec:
    """PartitionSpec for one array; a dimension the mesh axis does not divide is replicated."""
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules.get(name)
        if mesh_axis is None or mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]:
            mesh_axis = None
        spec.append(mesh_axis if mesh_axis not in spec else None)  # a mesh axis is used once
    return PartitionSpec(*spec)


def _shard(tree, axes_tree, mesh: Mesh, rules: Mapping[str, str | None]):
    def place(axes, x):
        return jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))

    return jax.tree.map(place, axes_tree, tree, is_leaf=_is_axes)


def shard_params(
    params: Params, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> Params:
    """Place every weight on `mesh` following `rules` (logical name -> mesh axis name or None)."""
    axes = jax.tree.map(_axes_like, _param_axes(len(params.layers), tied=params.lm_head is None),
                        params, is_leaf=_is_axes)
    return _shard(params, axes, mesh, rules)


def shard_cache(
    cache: KVCache, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> KVCache:
    """Place a KV cache on `mesh` following `rules`, its kv heads beside the k/v projections."""
    return _shard(cache, cache_logical_axes(len(cache.k)), mesh, rules)
