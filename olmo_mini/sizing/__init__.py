"""Sizing from the config and the model alone: FLOPs per token, datasheet peaks and the default
precision (``flops``), the per-device memory plan (``memory``). Below training: no Lightning,
no trainer. Import from the submodules; the package exports nothing."""
