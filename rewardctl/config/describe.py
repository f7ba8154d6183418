"""Each schema key's default and one-line doc, read from the dataclass source (its comment lines),
for `rewardctl train --help` and the commented block of conf/train.yaml: the schema is their one source."""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib.util
import inspect
import re
from typing import Any

FIELD = re.compile(r"^\s*(\w+)\s*:")
FIRST_SENTENCE = re.compile(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])|;\s+")


def field_docs(schema: type) -> dict[str, str]:
    """Field name -> the comment lines right above it, joined (empty when it has none)."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(schema).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = FIELD.match(line)
        if match:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def shown_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value: Any = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "???"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if dataclasses.is_dataclass(value):
        return "{...}"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def describe_keys(prefix: str, schema: type, width: int = 100) -> str:
    """``  prefix.key=default  first sentence of its doc`` per field (nested dataclasses expanded)."""
    docs = field_docs(schema)
    lines = []
    for field in dataclasses.fields(schema):
        if field.name.startswith("_"):
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            lines.append(describe_keys(f"{prefix}.{field.name}", type(default), width))
            continue
        lines.append(_entry(f"{prefix}.{field.name}", shown_default(field), docs.get(field.name, ""), width))
    return "\n".join(lines)


def describe_method_keys(target: str, width: int = 100) -> str:
    """A method's keys from its module's source, read without importing it (a method module imports
    torch; ``--help`` stays fast): the class named by ``target`` sets ``config_class``, a dataclass
    in the same module. Empty when the source cannot be read that way (a method defined elsewhere)."""
    module_name, _, class_name = target.rpartition(".")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    with open(spec.origin, encoding="utf-8") as handle:
        source = handle.read()
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}
    config_name = _config_class_name(classes.get(class_name))
    return _describe_source(classes.get(config_name), classes, source, width) if config_name else ""


def _config_class_name(cls: ast.ClassDef | None) -> str | None:
    for node in cls.body if cls else []:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if "config_class" in targets and isinstance(node.value, ast.Name):
            return node.value.id
    return None


def _describe_source(
    cls: ast.ClassDef | None, classes: dict[str, ast.ClassDef], source: str, width: int, prefix: str = "method"
) -> str:
    if cls is None:
        return ""
    lines = source.splitlines()
    out = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name.startswith("_") or name == "name":
            continue
        value = node.value
        nested = _nested_dataclass(value, classes)
        if nested is not None:
            out.append(_describe_source(nested, classes, source, width, f"{prefix}.{name}"))
            continue
        comments = []
        row = node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            comments.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        default = _shown_source_default(value)
        out.append(_entry(f"{prefix}.{name}", default, " ".join(comments), width))
    return "\n".join(out)


def _nested_dataclass(value: ast.expr | None, classes: dict[str, ast.ClassDef]) -> ast.ClassDef | None:
    """``field(default_factory=UdmConfig)`` with UdmConfig defined in the same module."""
    if isinstance(value, ast.Call):
        for keyword in value.keywords:
            if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Name):
                return classes.get(keyword.value.id)
    return None


def _shown_source_default(value: ast.expr | None) -> str:
    if value is None:
        return "???"
    if isinstance(value, ast.Constant):
        return (
            {None: "null", True: "true", False: "false"}.get(value.value, str(value.value))
            if value.value is None or isinstance(value.value, bool)
            else str(value.value)
        )
    if isinstance(value, ast.Attribute):  # an Enum member: its name is its value here
        return value.attr
    if isinstance(value, ast.Call):
        return "{}" if "dict" in ast.unparse(value) else "[]" if "list" in ast.unparse(value) else ast.unparse(value)
    return ast.unparse(value)


def _entry(key: str, default: str, doc: str, width: int) -> str:
    """``  key=default   first sentence of the doc``, cut to ``width``."""
    entry = f"  {key}={default}"
    first = FIRST_SENTENCE.split(doc, maxsplit=1)[0].rstrip(".")
    if not first:
        return entry
    room = max(20, width - max(len(entry), 44) - 1)
    return f"{entry:<44} {first if len(first) <= room else first[: room - 3] + '...'}"
