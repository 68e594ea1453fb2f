"""Schemas may annotate fields in PEP 604 form (``X | None``, ``list[int]``) as well as ``Optional``/``Union``:
both parse, coerce and are described the same way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import pytest

from engine.config import ConfigError, build_schema, describe_keys
from engine.config import schema_field as _f


@dataclass
class _Pep604:
    path: str | None = _f(None)
    lr: float | None = _f(None, min=0.0)
    freq: str | list[list[int]] | None = _f(None)
    sizes: list[int] = _f(default_factory=list)


@dataclass
class _Typing:
    path: Optional[str] = _f(None)  # noqa: UP045 - the typing form must keep working
    lr: Optional[float] = _f(None, min=0.0)  # noqa: UP045
    freq: Union[str, list[list[int]], None] = _f(None)  # noqa: UP007
    sizes: list[int] = _f(default_factory=list)


@pytest.mark.parametrize("schema", [_Pep604, _Typing], ids=["pep604", "typing"])
def test_union_fields_parse_and_coerce(schema):
    cfg = build_schema(schema, {"path": "/a", "lr": "1e-4", "freq": [[0, 1]], "sizes": [1, 2]})
    assert cfg.path == "/a" and cfg.freq == [[0, 1]] and cfg.sizes == [1, 2]
    assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(1e-4)  # numeric string widened to float
    cfg = build_schema(schema, {"path": None, "lr": None, "freq": "top16"})
    assert cfg.path is None and cfg.lr is None and cfg.freq == "top16"


@pytest.mark.parametrize("schema", [_Pep604, _Typing], ids=["pep604", "typing"])
def test_union_fields_refuse_bad_values(schema):
    with pytest.raises(ConfigError, match=r"config key 'path': expected str or null, got 3"):
        build_schema(schema, {"path": 3})
    with pytest.raises(ConfigError, match=r"config key 'freq': expected str or list or null"):
        build_schema(schema, {"freq": 1.5})
    with pytest.raises(ConfigError, match=r"config key 'sizes\[1\]': expected int, got 'x'"):
        build_schema(schema, {"sizes": [1, "x"]})
    with pytest.raises(ConfigError, match=r"expected float or null, got True"):
        build_schema(schema, {"lr": True})


def test_union_fields_are_described_alike():
    assert describe_keys(_Pep604) == describe_keys(_Typing)
    assert describe_keys(_Pep604)[0][1].startswith("str or null")
