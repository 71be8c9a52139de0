"""Composition root: wires memory, guest, device and transport; scenarios; peers; CLI."""
