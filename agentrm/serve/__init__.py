"""Serving an exported reward model over HTTP: ``python -m agentrm.serve`` (LitServe; docs/serving.md).

* :mod:`~agentrm.serve.config`: :class:`ServeConfig`, the command's one typed config;
* :mod:`~agentrm.serve.schema`: the request JSON (strict pydantic models), the limits, one-line refusals;
* :mod:`~agentrm.serve.spec`: the HTTP side (routes, validation, limits, overload);
* :mod:`~agentrm.serve.api`: the inference worker (batched scoring, per-request errors);
* :mod:`~agentrm.serve.sessions`: prefix KV caches per client session, bounded in bytes;
* :mod:`~agentrm.serve.server`: startup (bind and key checks), ``/info``, graceful shutdown.

The client is :class:`agentrm.scoring.remote.RemoteScorer` (``ScorerSpec(kind="remote")``).
"""

from agentrm.serve.config import ServeConfig

__all__ = ["ServeConfig"]
