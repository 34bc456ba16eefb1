"""Every API response a test receives can be checked against the app's own OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

import httpx
from jsonschema import Draft202012Validator


class OpenApiCheck:
    """Asserts that a response is documented: its status for its operation, its body by the
    schema of that status and media type."""

    def __init__(self, document: dict[str, Any]) -> None:
        self._components = document["components"]
        self._operations: list[tuple[re.Pattern[str], str, dict[str, Any]]] = []
        for template, item in document["paths"].items():
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
            for method, operation in item.items():
                self._operations.append((pattern, method.upper(), operation))

    def __call__(self, response: httpx.Response) -> None:
        request = response.request
        operation = next(
            (
                op
                for pattern, method, op in self._operations
                if method == request.method and pattern.match(request.url.path)
            ),
            None,
        )
        if operation is None:  # not an API route (e.g. a test of unknown paths)
            return
        where = f"{request.method} {request.url.path} -> {response.status_code}"
        documented = operation["responses"].get(str(response.status_code))
        assert documented is not None, f"{where}: status not in the OpenAPI document"
        media = response.headers.get("content-type", "").split(";")[0]
        content = documented.get("content", {})
        assert media in content, f"{where}: {media} not documented ({sorted(content)})"
        schema = {**content[media]["schema"], "components": self._components}
        errors = list(Draft202012Validator(schema).iter_errors(response.json()))
        assert not errors, f"{where}: body does not match the schema: {errors[0].message}"


def check_every_response(http: httpx.AsyncClient, document: dict[str, Any]) -> None:
    """Check every response `http` receives against `document` (the app's OpenAPI document)."""
    check = OpenApiCheck(document)

    async def documented(response: httpx.Response) -> None:
        await response.aread()
        check(response)

    http.event_hooks = {"response": [documented]}
