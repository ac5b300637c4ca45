"""Property tests (hypothesis) for issue 10: random JSON values to the config reader and the manifest reader, and
random strings to the CLIs' flags, give no traceback: every failure is the project's own error type with a
message, and the CLIs return 2. Nothing here builds or loads a model: the CLIs are stopped where their long work
would begin."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import build
from export import EngineFolderError, read_manifest
from export.engine_folder import FORMAT_VERSION, PROGRAMS, program_io, symbolic_state_layout, write_manifest
from export.engine_folder import BuildSettings
from model import ConfigError, MiniMaxConfig, MiniMaxForCausalLM
from tests.conftest import hf_tiny_config, to_official_config

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70) \
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _valid_configs() -> list[dict]:
    hf = hf_tiny_config().to_dict()
    return [MiniMaxConfig.preset("tiny").to_dict(), to_official_config(hf), hf]


CONFIGS = _valid_configs()


def _mutate(doc, path: list, value):
    """``doc`` with the value at ``path`` (keys/indices, taken modulo the container sizes) replaced by ``value``."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    if isinstance(doc, dict):
        key = sorted(doc, key=str)[path[0] % len(doc)]
        return {**doc, key: _mutate(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return doc[:i] + [_mutate(doc[i], path[1:], value)] + doc[i + 1:]


def _config_ok_or_config_error(d) -> None:
    try:
        config = MiniMaxConfig.from_dict(d)
    except ConfigError as e:
        assert str(e).strip()
        return
    assert isinstance(config, MiniMaxConfig)
    assert MiniMaxConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------------------------ config reader
@FAST
@given(value=json_values)
def test_config_reader_random_json(value):
    _config_ok_or_config_error(value)


@FAST
@given(which=st.integers(0, len(CONFIGS) - 1), path=st.lists(st.integers(0, 1000), min_size=1, max_size=3),
       value=json_values)
def test_config_reader_random_field_values(which, path, value):
    _config_ok_or_config_error(_mutate(CONFIGS[which], path, value))


@FAST
@given(which=st.integers(0, len(CONFIGS) - 1), drop=st.integers(0, 1000))
def test_config_reader_missing_fields(which, drop):
    d = dict(CONFIGS[which])
    d.pop(sorted(d)[drop % len(d)])
    _config_ok_or_config_error(d)


@FAST
@given(content=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_config_file_random_bytes(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    try:
        MiniMaxConfig.from_pretrained(tmp_path)
    except ConfigError as e:
        assert str(e).startswith(str(tmp_path / "config.json"))


# ---------------------------------------------------------------------------------------------- manifest reader
@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory) -> tuple[Path, dict]:
    """An engine folder with the real manifest structure and stand-in program files (no compilation)."""
    folder = tmp_path_factory.mktemp("fake_engine")
    config, s = MiniMaxConfig.preset("tiny"), BuildSettings(max_batch=2, max_input_len=8, max_seq_len=32)
    layout = symbolic_state_layout(config, s)
    (folder / "exported").mkdir()
    (folder / "weights").mkdir()
    (folder / "weights" / "weights-00001.safetensors").write_bytes(b"stand-in shard")
    for name in PROGRAMS:
        (folder / f"{name}.pt2").write_bytes(name.encode())
        (folder / "exported" / f"{name}.pt2").write_bytes(b"ep " + name.encode())
    manifest = {
        "format_version": FORMAT_VERSION, "backend": "aoti", "device": "cpu", "dtype": "float32",
        "model_config": config.to_dict(),
        "profiles": {"max_batch": 2, "max_input_len": 8, "max_seq_len": 32},
        "paged_kv": s.paged_layout(),
        "state_layout": layout,
        "programs": {n: {"file": f"{n}.pt2", "exported": f"exported/{n}.pt2",
                         **program_io(config.to_dict(), layout, n, s.paged_layout())} for n in PROGRAMS},
        "versions": {"torch": "2.13.0"}, "weights_sha256": "0" * 64, "build_timings": {"export_s": 1.0},
        "weights": {"format": "safetensors", "shards": ["weights/weights-00001.safetensors"],
                    "tensors": {"lm_head.weight": {"shape": [512, 64], "dtype": "float32",
                                                   "shard": "weights/weights-00001.safetensors"}}},
    }
    manifest = write_manifest(folder, manifest)
    assert read_manifest(folder) == manifest
    return folder, manifest


def _manifest_ok_or_refused(folder: Path, original: dict, content: bytes) -> None:
    (folder / "manifest.json").write_bytes(content)
    try:
        got = read_manifest(folder)
    except EngineFolderError as e:
        assert str(e).strip()
        return
    finally:
        (folder / "manifest.json").write_text(json.dumps(original, indent=2) + "\n")
    assert json.loads(content) == got
    # accepted only when it says what the folder was built with
    assert {k: v for k, v in got.items() if k != "files"} == {k: v for k, v in original.items() if k != "files"}


@FAST
@given(value=json_values)
def test_manifest_reader_random_json(fake_engine, value):
    folder, original = fake_engine
    _manifest_ok_or_refused(folder, original, json.dumps(value).encode())


@FAST
@given(path=st.lists(st.integers(0, 1000), min_size=1, max_size=4), value=json_values)
def test_manifest_reader_random_field_values(fake_engine, path, value):
    folder, original = fake_engine
    mutated = _mutate(original, path, value)
    _manifest_ok_or_refused(folder, original, json.dumps(mutated).encode())


@FAST
@given(content=st.binary(max_size=64))
def test_manifest_reader_random_bytes(fake_engine, content):
    folder, original = fake_engine
    _manifest_ok_or_refused(folder, original, content)


# ---------------------------------------------------------------------------------------------------- CLI flags
class ReachedWork(Exception):
    """Raised where a CLI would start building a model: every check passed."""


def _reached(*args, **kwargs):
    raise ReachedWork()


@pytest.fixture
def sandbox(monkeypatch):
    """An empty working folder, and the model constructor replaced so that no CLI does long work."""
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.chdir(tmp)
        monkeypatch.setattr(MiniMaxForCausalLM, "__init__", _reached)
        monkeypatch.setattr(MiniMaxForCausalLM, "from_pretrained", classmethod(_reached))
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.CRITICAL)  # the refusals' messages are not the point here
        try:
            yield Path(tmp)
        finally:
            root.setLevel(level)


flag_text = st.text(max_size=24) | st.sampled_from(["", " ", "-1", "0", "1", "2", "3.5", "nan", "inf", "-inf",
                                                    "1e9", "99999999999999999999999", "x", "--", "-", "tiny", "cpu",
                                                    "cuda", "meta", "banana", "fp32", "aoti", ".", "..", "\0"])


def _no_traceback(fn, argv) -> int | None:
    """``fn(argv)``: its return code, or None when it stopped at the long work (ReachedWork)."""
    with contextlib.redirect_stderr(open(os.devnull, "w")), contextlib.redirect_stdout(open(os.devnull, "w")):
        try:
            return fn(argv)
        except ReachedWork:
            return None


BUILD_FLAGS = ["--checkpoint", "--preset", "--out", "--backend", "--device", "--dtype", "--max-batch",
               "--max-input-len", "--max-seq-len"]


@FAST
@given(flag=st.sampled_from(BUILD_FLAGS), value=flag_text.filter(lambda v: "/" not in v))
def test_build_cli_random_flag_values(sandbox, flag, value):
    argv = ["--preset", "tiny", "--out", "engine", "--max-seq-len", "32"]
    if flag in ("--preset", "--checkpoint"):
        argv = [flag, value, "--out", "engine"]
    elif flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    code = _no_traceback(build.main, argv)
    assert code in (2, None), (argv, code)
    if code is None:  # every check passed: it only ever stops at the long work with a valid request
        assert not any(p.name.startswith(".") for p in sandbox.iterdir())  # the lock is released on the way out


@FAST
@given(argv=st.lists(flag_text.filter(lambda v: "/" not in v) | st.sampled_from(BUILD_FLAGS + ["--overwrite"]),
                     max_size=8))
def test_build_cli_random_argv(sandbox, argv):
    assert _no_traceback(build.main, argv) in (0, 2, None)  # 0: --help


MODEL_FLAGS = ["--checkpoint", "--preset", "--prompt-ids", "--max-new-tokens", "--dtype", "--device"]


@FAST
@given(flag=st.sampled_from(MODEL_FLAGS), value=flag_text.filter(lambda v: "/" not in v), compare=st.booleans())
def test_model_cli_random_flag_values(sandbox, flag, value, compare):
    from model.__main__ import main

    argv = ([flag, value] if flag in ("--preset", "--checkpoint") else ["--preset", "tiny", flag, value])
    argv += ["--compare-hf"] if compare else []
    assert _no_traceback(main, argv) in (2, None), argv


RUNTIME_FLAGS = ["--prompt", "--prompt-ids", "--tokenizer", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                 "--seed", "--eos-token-id", "--device"]


@FAST
@given(flag=st.sampled_from(RUNTIME_FLAGS), value=flag_text, engine=flag_text.filter(lambda v: "/" not in v))
def test_runtime_cli_random_flag_values(sandbox, flag, value, engine):
    """No engine folder exists in the sandbox: whatever the flags, the answer is a refusal (2), never a traceback."""
    from runtime.__main__ import main

    argv = [engine, "--prompt-ids", "5,6", flag, value] if flag not in ("--prompt", "--prompt-ids") else \
        [engine, flag, value]
    assert _no_traceback(main, argv) == 2, argv
