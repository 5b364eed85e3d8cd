"""``omniad serve``: a fitted model behind HTTP (FastAPI + uvicorn), with a page to try it at ``/``.

    from omniad.serve import create_app, load_model, run
    run(create_app(load_model("model")), host="127.0.0.1", port=8000)

The web framework is an optional extra (``pip install "omniad[serve]"``), imported only when an app is made;
``omniad.serve.service`` (loading, batching, decisions, overlays) needs none of it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from omniad.serve.service import BatchScorer, ServeError, load_model, model_info

# import name -> the distribution that provides it
_NEEDED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
           "prometheus_client": "prometheus-client"}


def require_serve_dependencies() -> None:
    """Raise an ``ImportError`` that says how to install what the service needs, when something is missing."""
    missing = [dist for module, dist in _NEEDED.items()
               if importlib.util.find_spec(module) is None
               and not (module == "python_multipart" and importlib.util.find_spec("multipart") is not None)]
    if missing:
        raise ImportError(f"omniad serve needs {', '.join(missing)}, which is not installed: "
                          'pip install "omniad[serve]"')


def create_app(detector: Any, **options: Any) -> Any:
    """The FastAPI app of one fitted model (see ``omniad.serve.app.create_app`` for the options)."""
    require_serve_dependencies()
    from omniad.serve.app import create_app as _create_app

    return _create_app(detector, **options)


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        threads: int | None = None) -> None:
    """Serve ``app`` with uvicorn until interrupted.

    Args:
        threads: torch's intra-op threads for this process (None: torch's default, one per core). On a machine
            whose cores other work also uses, 1 can be many times faster: spinning worker threads then wait on
            each other.
    """
    require_serve_dependencies()
    import uvicorn

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive number, got {threads}")
        import torch

        torch.set_num_threads(threads)

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["BatchScorer", "ServeError", "create_app", "load_model", "model_info", "require_serve_dependencies",
           "run"]
