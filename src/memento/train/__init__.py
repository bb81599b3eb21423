"""Two-stage memento SFT: stage 1 full causal attention, stage 2 the memento mask."""
