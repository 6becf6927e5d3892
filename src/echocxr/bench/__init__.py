"""Benchmarks: decode speed, RAD vs symmetric FLOPs, phantom learnability (each prints JSON)."""
