"""Serving models a registry names: the host a BentoML service declares, the manager that loads, gates and
swaps versions, the batcher, the follower of the registry, the promotion gate and the admin routes.

The runner kinds (what loads and predicts one artifact) are in `runners/`; the chain of registry
layers in `registry/`.
"""
