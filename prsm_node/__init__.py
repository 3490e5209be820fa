"""PRSM node: one daemon per participant of the PRSM peer-to-peer network."""

__version__ = "0.1.0"
