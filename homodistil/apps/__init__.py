"""The applications built on the engine: ``compare`` (the side-by-side study and its page),
``plan`` (a run's cost on a cluster) and ``report`` (a run's plots and tables). The
``homodistil`` command (:mod:`homodistil.cli`) routes to them."""
