"""Tensor parallelism: process groups, sharding, parallel layers, mappings, RNG."""
