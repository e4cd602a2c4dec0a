"""megatron_moetion: sparse checkpointing and localized recovery for Megatron-Core MoE training.

Implements, for Megatron-Core, the system of "Sparse Checkpointing for Fast and Reliable MoE
Training" (Gandhi and Kozyrakis, NSDI 2026; earlier MoEtion, later MoEvement). Importing the
package has no side effects; Megatron is only imported by ``megatron_hooks`` and ``adapter``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
