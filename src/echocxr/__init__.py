"""echocxr: chest X-ray report generation with one-step block diffusion (ECHO)."""

__version__ = "0.1.0"
