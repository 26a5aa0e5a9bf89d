"""pitstop: an open edge platform for Physical AI devices."""

__version__ = "0.1.0"
