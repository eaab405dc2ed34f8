"""The YAML loader of every perturb-lens config: PyYAML's safe loader, made strict.

On top of ``yaml.SafeLoader`` (no Python tags, no code):

- no YAML 1.1 base-60 numbers: ``lengths=1:20:1`` stays a string, not 4801 (YAML 1.2 dropped
  them too);
- a key given twice in one mapping is refused, naming the key and both lines (PyYAML keeps the
  last silently: a second ``data:`` block would drop the first one's ``source``);
- nesting deeper than :data:`MAX_DEPTH` is refused with the line, instead of exhausting Python's
  recursion limit in PyYAML's recursive composer.

PyYAML has no options for the last two, so they are hooks on its loader classes
(``construct_mapping``, ``compose_node``), the extension points PyYAML documents for custom loaders.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 64  # configs nest 3-4 levels; PyYAML's composer recurses ~3 frames per level


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping; ``key``, ``lines`` (1-based) say which and where."""

    def __init__(self, key: Any, lines: tuple[int, int], mark: yaml.Mark) -> None:
        self.key, self.lines = key, lines
        super().__init__(
            None, None, f"duplicate key {key!r} (lines {lines[0]} and {lines[1]})", mark
        )


class TooDeepError(yaml.composer.ComposerError):
    """Values nested deeper than :data:`MAX_DEPTH`; ``line`` (1-based) says where."""

    def __init__(self, mark: yaml.Mark) -> None:
        self.line = mark.line + 1
        super().__init__(None, None, f"values nest deeper than {MAX_DEPTH} levels", mark)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without base-60 numbers, duplicate keys or runaway nesting."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise TooDeepError(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:  # before merge keys (<<) are flattened in
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class refuses it
                    continue
                if first is not None:
                    raise DuplicateKeyError(key, (first, line), key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_NUMBERS = ("int", "float")
StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, re.compile(r"(?!.*:)" + rx.pattern, rx.flags) if tag.endswith(_NUMBERS) else rx)
        for tag, rx in resolvers
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the checks of :class:`StrictLoader`."""
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
