"""OpenAI-compatible image server over a sequence-parallel ``Engine`` (FastAPI + uvicorn)."""

from meshsp.serve.app import Limits, create_app, serve

__all__ = ["Limits", "create_app", "serve"]
