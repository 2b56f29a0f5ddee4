"""The HTTP service: an OpenAI-compatible embeddings API, search and item endpoints, and a web
gallery, over the same store and encoder as the CLI (``clipsearch serve``)."""

from .app import create_app
from .service import ServerSettings, Service

__all__ = ["ServerSettings", "Service", "create_app"]
