"""Conformance reports: the driver monitor and the device suite, run and rendered."""
