"""Cluster mode: the engine tier as Ray Serve replicas, the HTTP tier unchanged.

- :mod:`gateway.cluster.options`: Serve deployment options from the settings (replicas, GPUs,
  ``max_ongoing_requests`` from the engine's batch bounds, autoscaling). No Ray import.
- :mod:`gateway.cluster.replica`: the deployment body, one engine per replica.
- :mod:`gateway.cluster.voice_refs`: what crosses the tiers instead of conditionals.
- :mod:`gateway.cluster.deploy`: connect to Ray, deploy or attach to the engine application.
- :mod:`gateway.cluster.remote_engine`: the ``Engine`` the HTTP tier uses, backed by a
  streaming Serve handle.

Ray is imported only inside these modules' functions (the ``cluster`` extra is optional).
docs/scaling.md explains the design.
"""
