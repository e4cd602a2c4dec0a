"""The CPU demo: Megatron's pretrain() on a tiny MoE GPT, with a fault injected and recovered."""
