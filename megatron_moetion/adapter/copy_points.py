"""Where in Megatron's schedule snapshot copies may go: hooks that feed ``ChunkedCopies``.

A quiet point is the start of every attention block's forward (``Attention``, self- and
cross-attention, MTP layers' too): the previous layer's MoE combine has been issued before it
and the next dispatch only after it. Every MoE layer's forward (route, dispatch all-to-all,
experts, combine all-to-all) is bracketed as an all-to-all region, so that a quiet point inside
one (a model that nests attention in an MoE layer) issues nothing. The backward's all-to-alls
need no bracket: a chunk issued at a forward quiet point is queued on the copy stream after
every backward kernel issued before that point.
"""

from __future__ import annotations

from megatron_moetion.copy_schedule import ChunkedCopies


def install(model_chunks, chunks: ChunkedCopies) -> list:
    """Register the hooks on every model chunk; returns the handles (``remove()`` each)."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    handles = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, BaseMoELayer):
                handles.append(module.register_forward_pre_hook(
                    lambda *_: chunks.a2a_begin()))
                handles.append(module.register_forward_hook(lambda *_: chunks.a2a_end()))
            elif isinstance(module, Attention):
                handles.append(module.register_forward_pre_hook(
                    lambda *_: chunks.quiet_point()))
    return handles
