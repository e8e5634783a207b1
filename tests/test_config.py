"""SparsityConfig: defaults, validation, parse/str round trips."""

import dataclasses

import numpy as np
import pytest

from sparse24.config import SparsityConfig


def test_defaults():
    cfg = SparsityConfig()
    assert [f.name for f in dataclasses.fields(cfg)] == [
        "n", "m", "dense_sink_tokens", "dense_recent_tokens", "sparse_decode"
    ]
    assert (cfg.n, cfg.m, cfg.dense_sink_tokens, cfg.dense_recent_tokens, cfg.sparse_decode) == (
        2, 4, 0, 64, True
    )
    assert not cfg.is_dense
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n = 1
    assert hash(cfg) == hash(SparsityConfig())


def test_dense():
    cfg = SparsityConfig.dense()
    assert cfg == SparsityConfig(n=4, m=4, dense_sink_tokens=0, dense_recent_tokens=0)
    assert cfg.is_dense
    assert SparsityConfig(n=8, m=8).is_dense
    assert not SparsityConfig(n=7, m=8).is_dense


def test_numpy_ints_are_normalised():
    cfg = SparsityConfig(n=np.int64(1), m=np.int32(8))
    assert type(cfg.n) is int and type(cfg.m) is int
    assert cfg == SparsityConfig(n=1, m=8)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"m": 6}, r"SparsityConfig\.m must be 4 or 8, got 6"),
        ({"m": 2, "n": 1}, r"SparsityConfig\.m .*got 2"),
        ({"n": 0}, r"SparsityConfig\.n .*got 0"),
        ({"n": 5}, r"SparsityConfig\.n .*m=4.*got 5"),
        ({"n": 9, "m": 8}, r"SparsityConfig\.n .*got 9"),
        ({"n": -1}, r"SparsityConfig\.n .*got -1"),
        ({"dense_sink_tokens": -1}, r"SparsityConfig\.dense_sink_tokens must be >= 0, got -1"),
        ({"dense_recent_tokens": -3}, r"SparsityConfig\.dense_recent_tokens must be >= 0, got -3"),
    ],
)
def test_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SparsityConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 2.0}, r"SparsityConfig\.n must be an int, got 2\.0"),
        ({"n": True}, r"SparsityConfig\.n must be an int, got True"),
        ({"m": "4"}, r"SparsityConfig\.m must be an int, got '4'"),
        ({"m": 4.0}, r"SparsityConfig\.m must be an int"),
        ({"dense_sink_tokens": 1.5}, r"SparsityConfig\.dense_sink_tokens must be an int, got 1\.5"),
        ({"dense_recent_tokens": None}, r"SparsityConfig\.dense_recent_tokens must be an int, got None"),
        ({"dense_recent_tokens": False}, r"SparsityConfig\.dense_recent_tokens must be an int"),
        ({"sparse_decode": 1}, r"SparsityConfig\.sparse_decode must be a bool, got 1"),
        ({"sparse_decode": "false"}, r"SparsityConfig\.sparse_decode must be a bool, got 'false'"),
    ],
)
def test_invalid_types(kwargs, field):
    with pytest.raises(TypeError, match=field):
        SparsityConfig(**kwargs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2:4", SparsityConfig()),
        ("1:4", SparsityConfig(n=1)),
        ("4:8", SparsityConfig(n=4, m=8)),
        ("dense", SparsityConfig.dense()),
        (" DENSE ", SparsityConfig.dense()),
        ("2:4,sink=4,recent=64", SparsityConfig(dense_sink_tokens=4, dense_recent_tokens=64)),
        ("2:4,recent=0", SparsityConfig(dense_recent_tokens=0)),
        ("2:4,sparse_decode=false", SparsityConfig(sparse_decode=False)),
        ("2:4,sparse_decode=True", SparsityConfig(sparse_decode=True)),
        ("2:4,decode=dense", SparsityConfig(sparse_decode=False)),
        ("2:4,decode=sparse", SparsityConfig(sparse_decode=True)),
        (" 2 : 4 , sink = 4 ,recent= 8 ", SparsityConfig(dense_sink_tokens=4, dense_recent_tokens=8)),
        ("2:8,dense_sink_tokens=1,dense_recent_tokens=2",
         SparsityConfig(n=2, m=8, dense_sink_tokens=1, dense_recent_tokens=2)),
        ("dense,decode=dense", dataclasses.replace(SparsityConfig.dense(), sparse_decode=False)),
    ],
)
def test_parse(text, expected):
    assert SparsityConfig.parse(text) == expected


@pytest.mark.parametrize(
    "cfg",
    [
        SparsityConfig(),
        SparsityConfig.dense(),
        SparsityConfig(n=4, m=4),  # dense but not dense(): spelled out
        SparsityConfig(n=8, m=8, dense_recent_tokens=0),
        SparsityConfig(n=1, m=8, dense_sink_tokens=4, dense_recent_tokens=128, sparse_decode=False),
        SparsityConfig(n=3, m=4, dense_recent_tokens=0),
    ],
)
def test_str_round_trip(cfg):
    assert SparsityConfig.parse(str(cfg)) == cfg


def test_str_canonical():
    assert str(SparsityConfig()) == "2:4,sink=0,recent=64,sparse_decode=true"
    assert str(SparsityConfig.dense()) == "dense"
    assert str(SparsityConfig(n=4, m=8, sparse_decode=False)) == "4:8,sink=0,recent=64,sparse_decode=false"


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "expected 'N:M' or 'dense'"),
        ("2/4", "expected 'N:M' or 'dense'"),
        ("2:4:8", "expected 'N:M' or 'dense'"),
        ("sparse", "expected 'N:M' or 'dense'"),
        ("2:6", r"SparsityConfig\.m must be 4 or 8, got 6"),
        ("5:4", r"SparsityConfig\.n"),
        ("0:4", r"SparsityConfig\.n"),
        ("2:4,", "expected 'key=value'"),
        ("2:4,sink", "expected 'key=value'"),
        ("2:4,foo=1", "unknown key 'foo'"),
        ("2:4,sink=-1", "sink must be a non-negative integer"),
        ("2:4,recent=1.5", "recent must be a non-negative integer"),
        ("2:4,sparse_decode=maybe", "sparse_decode must be true or false"),
        ("2:4,decode=true", "decode must be 'sparse' or 'dense'"),
        ("2:4,sink=1,sink=2", "dense_sink_tokens given twice"),
        ("2:4,decode=dense,sparse_decode=true", "sparse_decode given twice"),
    ],
)
def test_parse_errors(text, why):
    with pytest.raises(ValueError, match=why) as info:
        SparsityConfig.parse(text)
    message = str(info.value)
    assert repr(text) in message  # names the text
    assert "accepted:" in message  # and what is accepted


def test_parse_type_error():
    with pytest.raises(TypeError, match="expects a str"):
        SparsityConfig.parse(24)


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    import sparse24.config

    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('cfg', {sparse24.config.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['cfg'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert mod.SparsityConfig.parse('2:4') == mod.SparsityConfig()\n"
        "assert 'torch' not in sys.modules, 'config imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
