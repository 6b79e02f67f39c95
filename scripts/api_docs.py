"""Render docs/api.md (models and request fields) and docs/request.schema.json from the model table and
the request schema the gateway validates with.

python scripts/api_docs.py           # write the files
python scripts/api_docs.py --check   # exit 1 if they differ from the schema (the tests run this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from catalogue.models import MODELS
from gateway.inputs.schema import DepthRequest

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# API reference

Generated from `catalogue/models.py` and `gateway/inputs/schema.py` by `python scripts/api_docs.py`; do not edit
by hand. The JSON Schema of the request is in [request.schema.json](request.schema.json); the response
is described in the README ("API").

## Models

Every result states `depth_units`, `depth_direction` and `depth_png_decode`; the response states the
model's `license` (as its model card gives it: check it before commercial use).

| `model` | depth | `process_res` (network short side) | licence |
|---|---|---|---|
{models}

## Request fields

| field | type | default | constraints | meaning |
|---|---|---|---|---|
"""


def model_rows() -> str:
    rows = []
    for model_id, spec in MODELS.items():
        if spec.metric:
            depth = f"metric: depth in metres, larger is farther (`m`, `distance`), up to {spec.max_depth:g} m"
        else:
            depth = "relative: inverse depth, larger is nearer, arbitrary scale (`relative`, `inverse`)"
        sizes = ", ".join(f"{size}{' (default)' if i == 0 else ''}" for i, (size, _b) in enumerate(spec.families))
        rows.append(f"| `{model_id}` | {depth} | {sizes} | {spec.license} |")
    return "\n".join(rows)


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
    return HEADER.format(models=model_rows()) + "\n".join(rows) + "\n", json.dumps(schema, indent=2) + "\n"


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
