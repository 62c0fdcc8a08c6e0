"""MLServer's Hugging Face runtime with BERT's padding put right (imported by MLServer from its own venv).

mlserver-huggingface 1.7.1 tests `if not tokenizer.pad_token_id` before batching: BERT's pad token
id is 0, which reads as "no pad token", and with no eos token either it falls back to batches of
one, so adaptive batching would batch requests and then run them one by one. This subclass gives
the pipeline its batch size back once the tokenizer's real pad token is in place. It also stubs
`optimum.pipelines` when importing it fails (optimum's ONNX exporter needs private torch.onnx names
torch 2.13 dropped); only the runtime's optimum (ORT) path uses it, and it is not used here.
"""

import sys
import types

try:  # optimum's ONNX exporter imports private torch.onnx names that torch 2.13 no longer has
    import optimum.pipelines  # noqa: F401
except Exception:  # only the ORT (optimum_model) path needs it, and this benchmark does not use it
    _stub = types.ModuleType("optimum.pipelines")

    def _no_optimum(*args, **kwargs):
        raise RuntimeError("optimum pipelines are unavailable in this environment")

    _stub.pipeline = _no_optimum
    _stub.ORT_SUPPORTED_TASKS = _stub.SUPPORTED_TASKS = {}
    sys.modules["optimum.pipelines"] = _stub

from mlserver_huggingface import HuggingFaceRuntime  # noqa: E402


class PaddedHuggingFaceRuntime(HuggingFaceRuntime):
    async def load(self) -> bool:
        loaded = await super().load()
        pipeline = self._model
        tokenizer = pipeline.tokenizer
        if tokenizer.pad_token is not None and isinstance(tokenizer.pad_token_id, int):
            pipeline._batch_size = max(1, self.settings.max_batch_size or 1)
            from mlserver.logging import logger

            logger.info("bench: pad token %r (id %d) restored, pipeline batch size %d", tokenizer.pad_token,
                        tokenizer.pad_token_id, pipeline._batch_size)
        return loaded
