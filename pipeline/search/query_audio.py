"""Query by audio for :class:`pipeline.search.reader.StoreReader`: the store's model (from its
run records), checked against the store, and the embedding of an audio file through the
pipeline's own path (:func:`pipeline.engine.inference.embed_uri`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.errors import AudioQueryError, ModelMismatchError, ModelUnavailableError
from pipeline.io.objects import fsspec_options
from pipeline.store.tables import Store


class AudioQueries:
    """The query-by-audio half of :class:`pipeline.search.reader.StoreReader` (a base class of
    it): needs ``root``, ``storage_options``, ``tables`` (the :class:`Store`), ``model_id`` and
    ``model_ids``, set by the reader."""

    root: str
    storage_options: dict[str, Any]
    tables: Store
    model_id: str | None
    model_ids: list[str]
    model: Any = None  # the query-by-audio model once set (see set_model / load_model)
    _model_lock: threading.Lock

    def run_args(self) -> dict[str, Any]:
        """``args_json`` of the latest successful run of the store's model (``{}`` if unknown)."""
        runs = self.tables.open("runs")
        if runs is None or self.model_id is None:
            return {}
        cols = [
            c
            for c in ("args_json", "model_id", "status", "finished_at", "started_at")
            if c in runs.schema.names
        ]
        rows = runs.to_table(columns=cols).to_pylist()
        rows = [r for r in rows if r.get("model_id") == self.model_id and r.get("args_json")]
        if not rows:
            return {}

        def when(r: dict[str, Any]) -> float:
            ts = r.get("finished_at") or r.get("started_at")
            return ts.timestamp() if hasattr(ts, "timestamp") else 0.0

        rows.sort(key=lambda r: (r.get("status") == "ok", when(r)))
        try:
            args = json.loads(rows[-1]["args_json"])
        except (TypeError, ValueError):
            return {}
        return args if isinstance(args, dict) else {}

    def check_model(self, model: Any) -> None:
        """Raise :class:`ModelMismatchError` unless ``model.model_id`` is the store's model."""
        mid = getattr(model, "model_id", None)
        if not self.model_ids:
            return  # empty store: nothing to compare against
        if mid not in self.model_ids:
            have = self.model_id or ", ".join(self.model_ids)
            raise ModelMismatchError(
                f"the query model {mid} is not the model that built this store ({have}): vectors of "
                "different models are not comparable; use the checkpoint that embedded the store"
            )

    def set_model(self, model: Any) -> None:
        """Use ``model`` for query-by-audio after checking it is the store's model."""
        self.check_model(model)
        self.model = model

    def load_model(
        self,
        checkpoint: str | None = None,
        stats: str | None = None,
        model_config: str | None = None,
        device: str | None = None,
    ) -> Any:
        """Load (via :func:`pipeline.engine.inference.load_model`) and check the query-by-audio model.

        Missing ``checkpoint`` / ``stats`` / ``model_config`` are taken from the store's run
        records (``runs.lance`` ``args_json``) of its model. Raises :class:`ModelUnavailableError`
        when no checkpoint is known and :class:`ModelMismatchError` when the loaded model is not
        the store's.
        """
        from pipeline.engine import inference

        args = self.run_args() if checkpoint is None else {}
        checkpoint = checkpoint or args.get("checkpoint")
        if not checkpoint:
            raise ModelUnavailableError(
                "query by audio needs the store's model: pass --checkpoint (and --stats / --model-config); "
                "the store's run records name none"
            )
        stats = stats if stats is not None else args.get("stats")
        model_config = model_config if model_config is not None else args.get("model_config")
        try:
            model = inference.load_model(
                checkpoint,
                stats,
                model_config,
                device,
                storage_options=fsspec_options(self.root, self.storage_options) or None,
            )
        except Exception as e:  # noqa: BLE001 - any load failure (missing file, hub offline...) is one reason
            raise ModelUnavailableError(f"cannot load the model {checkpoint}: {e}") from None
        self.set_model(model)
        return model

    def embed_audio(
        self, uri: str, layer: int, model: Any = None, storage_options: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """The track-level vector of ``layer`` for an audio file/URI, through the pipeline's embed
        path, with the window/hop of the store's runs. Checks the model first."""
        from pipeline.engine import inference
        from pipeline.errors import PipelineError

        if model is None:
            with self._model_lock:
                if self.model is None:
                    self.load_model()
            model = self.model
        self.check_model(model)
        args = self.run_args()
        kwargs: dict[str, Any] = {}
        for key in ("window_s", "hop_s", "loudness_target_db"):
            if isinstance(args.get(key), int | float):
                kwargs[key] = float(args[key])
        so = (
            storage_options
            if storage_options is not None
            else fsspec_options(self.root, self.storage_options) or None
        )
        try:
            with self._model_lock:
                emb = inference.embed_uri(str(uri), model, [layer], storage_options=so, **kwargs)
        except PipelineError as e:
            raise AudioQueryError(f"cannot embed {uri}: {e}") from None
        except (OSError, ValueError) as e:
            raise AudioQueryError(f"cannot embed {uri}: {e}") from None
        return np.asarray(emb.track[layer], dtype=np.float32)
