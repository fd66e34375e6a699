"""Quality checks against eager PyTorch: graph parity, quantized parity, NVFP4 emulation, calibration data."""
