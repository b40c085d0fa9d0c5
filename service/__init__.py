"""The HTTP service: FastAPI + uvicorn around a verified detector bundle.

``create_app(settings)`` builds the app; ``detector-serve`` (``service.cli:main``) runs it.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
