"""The Megatron adapter layer: everything here may import ``megatron``.

Nothing below this layer does; ``megatron_hooks`` is the entry point the patched Megatron calls.
"""
