"""MLflow's process-wide knobs, set in one place: REST timeouts and the fluent API's URIs."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional


def configure_mlflow_http(timeout: float, retries: int) -> None:
    """Bound MLflow's REST calls; MLflow reads these variables on each request.

    A value the user set explicitly wins: these are MLflow's own knobs.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


#: MLflow's fluent API (runs, the tracking and registry URIs) is process-wide state.
_FLUENT_LOCK = threading.RLock()


@contextlib.contextmanager
def mlflow_uris(uri: Optional[str]) -> Iterator[None]:
    """Point MLflow's process-wide URIs at `uri` for one operation, then put them back.

    Some MLflow paths ignore the URIs they are given (a `models:/` download resolves the logged
    model through the global tracking URI), and `mlflow.set_tracking_uri` also writes
    `MLFLOW_TRACKING_URI` into the environment, which every subprocess started later would
    inherit. One such operation at a time per process.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    with _FLUENT_LOCK:
        saved = {k: os.environ.get(k) for k in names}
        # MLflow's own module state, not get_*_uri(): those compute a default (a local sqlite
        # store) that, set back, would stick for every client created later in this process.
        previous = (tracking_state._tracking_uri, registry_state._registry_uri)
        # None is what MLflow keeps when nothing is set: its annotations say str only.
        mlflow.set_tracking_uri(uri)  # type: ignore[arg-type]
        mlflow.set_registry_uri(uri)  # type: ignore[arg-type]
        try:
            yield
        finally:
            tracking_state._tracking_uri, registry_state._registry_uri = previous
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
