"""Reading the project's YAML (configs, manifests, prior configs) safely and fast.

Every YAML file or override value is text the user controls. ``read_yaml`` / ``parse_yaml``
bound what it may cost: at most ``MAX_BYTES`` of UTF-8 text without NUL bytes, checked before
parsing, and at most ``MAX_NODES`` nodes once aliases are expanded, counted on the composed
graph before any Python object is built (``&a`` / ``*a``: a few hundred characters of nested
aliases stand for hundreds of millions of nodes, the "billion laughs"). Tags other than
YAML's own are refused by ``yaml.SafeLoader`` as before. Any refusal is a ``YamlError`` (a
``ValueError``) saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
"""The largest YAML text read (1 MiB; the project's configs and manifests are a few kB)."""


class YamlError(ValueError):
    """Text that is not acceptable YAML for the project: too large, not UTF-8, aliases, syntax."""


MAX_NODES = 100_000
"""The most YAML nodes a document may stand for once every alias is expanded."""


def expanded_size(node: yaml.Node, memo: dict[int, int] | None = None) -> int:
    """Nodes of the document with every alias expanded (aliases share the anchored node, so
    the count is memoised per node: linear in the text, however deep the nesting)."""
    memo = {} if memo is None else memo
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias counts once
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo)
                                for k, v in node.value)
        else:
            memo[key] = 1
    return memo[key]


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a document whose aliases expand past ``MAX_NODES`` nodes
    (plain anchors and merge keys, as the manifests use them, stay allowed)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            size = expanded_size(node)
            if size > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"its aliases (*name) expand to {size} nodes, more than the "
                    f"{MAX_NODES} allowed", node.start_mark)
        return node


def parse_yaml(text: str, what: str = "YAML") -> Any:
    """Parse YAML text within the bounds above; ``YamlError`` names ``what`` and the reason."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{what}: {len(text)} characters is more than the {MAX_BYTES} allowed")
    if "\x00" in text:
        raise YamlError(f"{what}: contains NUL bytes: not YAML text")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise YamlError(f"{what}: not valid YAML: {err}") from None


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """Read and parse a YAML file: ``OSError`` if it cannot be read, ``YamlError`` if it is
    larger than ``MAX_BYTES`` (checked before reading), not UTF-8, or not acceptable YAML."""
    path = Path(path)
    size = path.stat().st_size
    label = f"{what} {path}"
    if size > MAX_BYTES:
        raise YamlError(f"{label}: {size} bytes is more than the {MAX_BYTES} allowed")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YamlError(f"{label}: not UTF-8 text (byte {err.start}): not a YAML file") from None
    return parse_yaml(text, label)
