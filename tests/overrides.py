"""Config copies with a few keys changed, for tests."""

from typing import Any, TypeVar

from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def with_overrides(config: ConfigT, **overrides: Any) -> ConfigT:
    """Return a validated copy of `config` with section__key overrides, e.g. teacher_train__epochs=2.

    Keys may go deeper than one section: prune__finetune__epochs=1.
    """
    tree = config.model_dump(mode="json")
    for key, value in overrides.items():
        *sections, name = key.split("__")
        node = tree
        for section in sections:
            node = node[section]
        node[name] = value
    return type(config).model_validate(tree)
