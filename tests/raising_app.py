"""The service with one extra route that fails as a bug would: for the test of unexpected errors.

    uvicorn --factory tests.raising_app:create_app
"""

from __future__ import annotations

from service.app import create_app as create_service


def create_app():
    app = create_service()

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug, not the client's fault")

    return app
