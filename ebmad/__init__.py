"""ebmad: energy-based anomaly detection and localization (Genc et al., Intel Labs)."""

__version__ = "0.1.0"
