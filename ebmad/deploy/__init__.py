"""Deployment: ONNX export, line thresholds and their calibration, the overlays predict draws."""
