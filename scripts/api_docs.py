"""Render docs/api.md and docs/request.schema.json from the request schema the gateway validates with.

python scripts/api_docs.py           # write the files
python scripts/api_docs.py --check   # exit 1 if they differ from the schema (the tests run this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gateway.schema import DepthRequest

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# Request fields

Generated from `gateway/schema.py` by `python scripts/api_docs.py`; do not edit by hand.
The JSON Schema of the same model is in [request.schema.json](request.schema.json).
The response is described in the README ("API").

| field | type | default | constraints | meaning |
|---|---|---|---|---|
"""


def type_name(prop: dict) -> str:
    if "anyOf" in prop:
        return " or ".join(type_name(p) for p in prop["anyOf"] if p.get("type") != "null")
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if prop.get("type") == "array":
        return f"list of {type_name(prop['items'])}"
    if "$ref" in prop:
        return "object"
    return prop.get("type", "any")


def render() -> tuple[str, str]:
    schema = DepthRequest.model_json_schema()
    rows = []
    for name, prop in schema["properties"].items():
        field = DepthRequest.model_fields[name]
        default = "-" if field.default is None else f"`{json.dumps(field.get_default(call_default_factory=True))}`"
        limits = [f"{k} {prop[k]}" for k in ("minimum", "maximum", "minItems") if k in prop]
        rows.append(f"| `{name}` | {type_name(prop)} | {default} | {', '.join(limits)} | {field.description} |")
    return HEADER + "\n".join(rows) + "\n", json.dumps(schema, indent=2) + "\n"


def main() -> int:
    table, schema = render()
    targets = {ROOT / "docs" / "api.md": table, ROOT / "docs" / "request.schema.json": schema}
    if "--check" in sys.argv:
        stale = [str(path) for path, text in targets.items() if not path.exists() or path.read_text() != text]
        if stale:
            print("out of date (run python scripts/api_docs.py):", ", ".join(stale))
            return 1
        return 0
    for path, text in targets.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
