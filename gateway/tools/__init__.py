"""Operator tools that ship with the gateway (load test)."""
