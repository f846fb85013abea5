"""Training: the loop, FSDP, packing, post-training (SFT/DPO), pruning and distillation."""
