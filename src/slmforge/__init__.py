"""slmforge: from a domain corpus to a measured, deployable specialized small language model."""

__version__ = "0.1.0"
