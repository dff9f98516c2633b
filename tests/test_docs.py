"""The API docs page works offline: Swagger UI's script and styles come from this server, not a CDN."""

from __future__ import annotations

import re

from bot.runtime import Deps
from tests.conftest import web_client


async def test_the_docs_page_loads_swagger_ui_from_this_server_only(deps: Deps) -> None:
    async with web_client(deps) as client:
        page = await client.get("/api/v1/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
        assert sorted(urls) == [
            "/api/v1/docs/static/favicon-32x32.png",
            "/api/v1/docs/static/swagger-ui-bundle.js",
            "/api/v1/docs/static/swagger-ui.css",
            "/api/v1/openapi.json",
        ], page.text
        assert "http://" not in page.text and "https://" not in page.text, "nothing is fetched from elsewhere"

        script = await client.get("/api/v1/docs/static/swagger-ui-bundle.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "SwaggerUIBundle" in script.text
        css = await client.get("/api/v1/docs/static/swagger-ui.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert (await client.get("/api/v1/docs/oauth2-redirect")).status_code == 200
        schema = (await client.get("/api/v1/openapi.json")).json()
        assert schema["openapi"].startswith("3.1"), "Swagger UI 5 reads OpenAPI 3.1"
