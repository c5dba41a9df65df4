"""JSON Schema of every configuration type, for editors (``meshgpu config schema``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from meshgpu.config.loader import Configuration


def json_schema() -> dict[str, Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[Configuration, Field(discriminator="type")])
    schema = adapter.json_schema(mode="validation")
    # ``replicas`` also takes the list of replica groups (moved to ``groups`` before validation).
    replicas = schema["$defs"]["ServiceConfiguration"]["properties"]["replicas"]
    replicas["anyOf"] = [
        *replicas.get("anyOf", [replicas]),
        {"type": "array", "items": {"$ref": "#/$defs/ServiceGroup"}},
    ]
    schema["$defs"]["ServiceGroup"]["properties"]["replicas"] = schema["$defs"]["ServiceGroup"][
        "properties"
    ]["count"]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "meshgpu configuration (dstack-compatible .dstack.yml)"
    return schema
