"""Local control socket: JSON lines over a Unix socket (see protocols/control.md)."""
