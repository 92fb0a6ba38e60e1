"""hotpeft.model: the base model. Where it comes from (`source`), its fingerprint (`fingerprint`),
loading it with a precision (`load`, imports torch), and the one description of its architecture
(`arch`) that the engine, adapter validation, the trainer and the benchmark read.

This package imports nothing else of hotpeft's. Its `__init__` stays free of torch, so that
light callers (the CLI, configuration) can read names and defaults quickly.
"""
from hotpeft.model import quiet
from hotpeft.model.arch import PROJECTIONS, Architecture, UnsupportedModel
from hotpeft.model.source import DEFAULT_MODEL_ID, ModelSource, ModelUnavailable, resolve_model

quiet.install()  # before anything imports bitsandbytes

__all__ = ["PROJECTIONS", "Architecture", "UnsupportedModel", "DEFAULT_MODEL_ID", "ModelSource", "ModelUnavailable",
           "resolve_model"]
