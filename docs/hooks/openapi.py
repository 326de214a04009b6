"""mkdocs hook: the HTTP API reference page, rendered from the app's own OpenAPI document
(jobs.web.openapi.document), so the page cannot drift from the routes. A page holding the
line ``<!-- openapi -->`` gets the operations, grouped by tag, in its place."""

from __future__ import annotations

import json
from typing import Any

MARKER = "<!-- openapi -->"


def _schema(schema: Any) -> str:
    if not isinstance(schema, dict):
        return ""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#schema-{name.lower()})"
    return f"`{json.dumps(schema, ensure_ascii=False)}`"


def render(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    tags = {tag["name"]: tag.get("description", "") for tag in doc.get("tags", [])}
    for tag, description in tags.items():
        lines += [f"## {tag}", "", description, ""]
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if tag not in op.get("tags", []):
                    continue
                guarded = " (token)" if op.get("security") else ""
                lines += [f"### `{method.upper()} {path}`{guarded}", ""]
                lines += [f"{op.get('summary', '')}. Operation id: `{op['operationId']}`.", ""]
                params = op.get("parameters") or []
                if params:
                    lines += ["| parameter | in | required | schema |", "|---|---|---|---|"]
                    for p in params:
                        required = "yes" if p.get("required") else "no"
                        lines.append(
                            f"| `{p['name']}` | {p['in']} | {required} | {_schema(p['schema'])} |"
                        )
                    lines.append("")
                body = op.get("requestBody")
                if body:
                    for kind, content in body["content"].items():
                        lines += [f"Body (`{kind}`): {_schema(content.get('schema'))}", ""]
                lines += ["| status | meaning | body |", "|---|---|---|"]
                for status, response in op["responses"].items():
                    contents = response.get("content") or {}
                    shown = ", ".join(_schema(c.get("schema")) for c in contents.values())
                    lines.append(f"| {status} | {response['description']} | {shown} |")
                lines.append("")
    lines += ["## Schemas", ""]
    for name, schema in sorted(doc["components"]["schemas"].items()):
        lines += [
            f"### {name} {{#schema-{name.lower()}}}",
            "",
            "```json",
            json.dumps(schema, indent=2, ensure_ascii=False),
            "```",
            "",
        ]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from jobs.web.openapi import document

    return markdown.replace(MARKER, render(document()))
