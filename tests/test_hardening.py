"""Issue 10 (hardening): a build never deletes what is not its own, two builds of one folder leave one engine and
one clean refusal, a terminated build leaves nothing, manifests are trusted only when intact (edited fields,
emptied ``files``, raised limits are refused by name, also against the limits compiled into the programs), and
bad CLI input gets a message and exit code 2 instead of a traceback.

One real engine is built here (by a ``build.py`` subprocess, racing an in-process build of the same folder); the
rest runs before any long work."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import build
from export import EngineFolderError, read_manifest
from export.engine_folder import (
    CONTRACT_NAME,
    DestinationLock,
    canonical_json,
    remove_stale_staging,
    reserve_destination,
    staged_folder,
    write_manifest,
)
from export.progress import progress
from model import ConfigError, MiniMaxConfig, MiniMaxForCausalLM
from runtime import Engine, RequestError

ROOT = Path(__file__).resolve().parents[1]
BUILD_FLAGS = ["--max-batch", "2", "--max-input-len", "8", "--max-seq-len", "32"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _beside(folder: Path) -> list[str]:
    """What lies beside ``folder`` that a build could have left: staging folders, lock files."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "README.md").write_text("my project\n")
    (path / "src").mkdir()
    (path / "src" / "main.py").write_text("print('hi')\n")
    return path


def _user_files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ item 1: --overwrite
def test_overwrite_refuses_a_folder_that_is_not_an_engine(tmp_path, caplog, monkeypatch):
    project = _user_folder(tmp_path / "project")
    before = _user_files(project)
    assert build.main(["--preset", "tiny", "--out", str(project), "--overwrite"]) == 2
    assert "is not an engine folder" in caplog.text and "refusing to replace it" in caplog.text
    assert build.main(["--preset", "tiny", "--out", str(project)]) == 2
    monkeypatch.chdir(project)  # the case: --out . inside a project
    assert build.main(["--preset", "tiny", "--out", ".", "--overwrite"]) == 2
    assert _user_files(project) == before and _beside(project) == []
    # a folder whose manifest.json is not an engine manifest is no engine folder either
    (project / "manifest.json").write_text('{"name": "my web app"}')
    assert build.main(["--preset", "tiny", "--out", str(project), "--overwrite"]) == 2
    assert (project / "README.md").exists()


@pytest.mark.parametrize("out, message", [
    ("", "the engine folder path is empty"),
    ("/proc/engine", "cannot write beside /proc/engine"),
    ("FILE/engine", "is a file, not a folder"),
    ("x\0y", "cannot hold a NUL character"),
])
def test_unusable_out_is_refused_before_work(tmp_path, caplog, monkeypatch, out, message):
    (tmp_path / "FILE").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MiniMaxForCausalLM, "__init__", _no_work)
    assert build.main(["--preset", "tiny", "--out", out]) == 2
    assert message in caplog.text


def _no_work(*args, **kwargs):
    raise AssertionError("the build went on to build the model")


def test_read_only_out_is_refused(tmp_path, caplog, monkeypatch):
    # root ignores permission bits: the check itself is exercised through os.access
    real_access = os.access
    monkeypatch.setattr("export.engine_folder.os.access",
                        lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(MiniMaxForCausalLM, "__init__", _no_work)
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "ro" / "engine")]) == 2
    assert "cannot write into" in caplog.text and "permission denied" in caplog.text


# ------------------------------------------------------------------------------------ item 2: concurrent builds
def test_destination_changed_during_the_build_is_left_alone(tmp_path):
    dest = tmp_path / "engine"
    with pytest.raises(EngineFolderError, match="changed during the build"):
        with staged_folder(dest) as staging:
            (staging / "prefill.pt2").write_bytes(b"new")
            _user_folder(dest)  # a writer that does not take the lock
    assert _user_files(dest) == {"README.md": "my project\n", "src/main.py": "print('hi')\n"}
    assert _beside(dest) == []
    # an engine folder we were told to replace that became something else meanwhile
    shutil.rmtree(dest)
    dest.mkdir()
    (dest / "manifest.json").write_text('{"format_version": 2, "backend": "aoti"}')
    with pytest.raises(EngineFolderError, match="changed during the build|not an engine folder"):
        with staged_folder(dest, overwrite=True):
            (dest / "manifest.json").unlink()
            (dest / "notes.txt").write_text("mine")
    assert (dest / "notes.txt").read_text() == "mine" and _beside(dest) == []


def test_lock_refuses_a_second_build_and_is_removed(tmp_path):
    dest = tmp_path / "engine"
    with reserve_destination(dest):
        assert (tmp_path / ".engine.lock").exists()
        lock = DestinationLock(dest.resolve())  # another open file description: as another process would
        with pytest.raises(EngineFolderError, match="another build .*writing"):
            lock.acquire()
        with staged_folder(dest) as staging:  # the same thread's own build reuses its lock
            (staging / "x").write_text("1")
    assert not (tmp_path / ".engine.lock").exists() and (dest / "x").exists()


@pytest.fixture(scope="module")
def raced_engine(tmp_path_factory):
    """A real tiny engine, built by ``build.py`` in a subprocess while an in-process build of the same folder is
    refused: (folder, the refused build's exit code and log, the subprocess's stderr)."""
    out = tmp_path_factory.mktemp("raced") / "tiny"
    proc = subprocess.Popen([sys.executable, str(ROOT / "build.py"), "--preset", "tiny", "--out", str(out),
                             *BUILD_FLAGS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MINIMAX_PROGRESS_INTERVAL_S": "2"})
    lock = out.with_name(".tiny.lock")
    deadline = time.monotonic() + 120
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), proc.communicate()
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    try:
        second = build.main(["--preset", "tiny", "--out", str(out), *BUILD_FLAGS])
        second_overwrite = build.main(["--preset", "tiny", "--out", str(out), "--overwrite", *BUILD_FLAGS])
    finally:
        logging.getLogger().removeHandler(handler)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return out, (second, second_overwrite, "\n".join(handler.lines)), stderr


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_two_concurrent_builds_leave_one_engine_and_one_refusal(raced_engine):
    out, (second, second_overwrite, log), stderr = raced_engine
    assert (second, second_overwrite) == (2, 2)
    assert "another build is writing" in log
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no staging folder, no lock file
    assert read_manifest(out)["profiles"]["max_seq_len"] == 32
    # item 6: folder mode from the umask (not mkdtemp's 0700), progress during lowering, no LeafSpec warning
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert "still running" in stderr and "LeafSpec" not in stderr


# ------------------------------------------------------------------------------------ item 3: SIGTERM, stale folders
def test_sigterm_during_the_build_leaves_nothing(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.Popen([sys.executable, str(ROOT / "build.py"), "--preset", "tiny", "--out", str(out),
                             *BUILD_FLAGS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not any(
            p.name.startswith(".tiny.building-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(1.0)  # inside export / lowering
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_of_dead_builds_are_removed(tmp_path, caplog):
    dest = tmp_path / "engine"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".engine.building-{dead}-0123abcd"
    stale.mkdir()
    (stale / "prefill.pt2").write_bytes(b"x" * 1000)
    running = tmp_path / f".engine.building-{alive}-0123abcd"
    running.mkdir()
    other = tmp_path / f".other.building-{dead}-0123abcd"  # another destination's: not ours to judge
    other.mkdir()
    caplog.set_level(logging.INFO)
    with reserve_destination(dest):
        pass
    assert not stale.exists() and running.exists() and other.exists()
    assert f"removed {stale}" in caplog.text and f"leaving {running}" in caplog.text
    # a build killed between moving the old engine aside and the new one in: the old engine comes back
    old = tmp_path / f".engine.old-{dead}-0123abcd"
    old.mkdir()
    (old / "manifest.json").write_text('{"format_version": 2, "backend": "aoti"}')
    assert remove_stale_staging(dest) == [] and (dest / "manifest.json").exists()


def test_interrupted_build_in_process_removes_its_staging(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise build.Terminated()

    monkeypatch.setattr("export.exporting.export_programs", interrupted)
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "e"), *BUILD_FLAGS]) == 143
    assert list(tmp_path.iterdir()) == []


def test_a_stop_that_torch_turns_into_another_error_is_still_a_stop(tmp_path, monkeypatch, caplog):
    """CI saw SIGTERM land inside torch.export's tracing and come back out of torch as an ordinary exception:
    the build then exited 1 with a traceback instead of 143. The handler records the signal, so it is a stop
    whatever the exception looks like."""
    def traced(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Terminated here
            time.sleep(5)
        except KeyboardInterrupt as e:
            raise RuntimeError("an operator's Python callback failed") from e
        raise AssertionError("SIGTERM did not interrupt the build")

    monkeypatch.setattr("export.exporting.export_programs", traced)
    caplog.set_level(logging.INFO)
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "e"), *BUILD_FLAGS]) == 143
    assert "terminated (SIGTERM)" in caplog.text
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone once main returns

    def failing(*args, **kwargs):
        raise RuntimeError("a real failure")  # no signal: not a stop, it propagates

    monkeypatch.setattr("export.exporting.export_programs", failing)
    with pytest.raises(RuntimeError, match="a real failure"):
        build.main(["--preset", "tiny", "--out", str(tmp_path / "f"), *BUILD_FLAGS])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ item 5: manifest integrity
def _copy(engine: Path, dest: Path) -> Path:
    shutil.copytree(engine, dest)
    return dest


def _edit(folder: Path, fn) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _tampered(value):
    """A different JSON value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [value[-1] if value else 0]
    if isinstance(value, dict):
        return {**value, "tampered": 1}
    return 0


def test_every_edited_manifest_field_is_refused_by_name(raced_engine, tmp_path):
    engine, _, _ = raced_engine
    manifest = json.loads((engine / "manifest.json").read_text())
    assert set(manifest) >= {"format_version", "backend", "device", "dtype", "model_config", "profiles",
                             "state_layout", "programs", "versions", "weights_sha256", "build_timings", "files"}
    copy = _copy(engine, tmp_path / "copy")
    for key, value in manifest.items():
        for nested in (value.items() if isinstance(value, dict) and key != "files" else [(None, None)]):
            sub, sub_value = nested

            def edit(m, key=key, sub=sub, sub_value=sub_value):
                if sub is None:
                    m[key] = _tampered(m[key])
                else:
                    m[key][sub] = _tampered(sub_value)
                return m

            (copy / "manifest.json").write_text((engine / "manifest.json").read_text())
            _edit(copy, edit)
            name = key if sub is None else f"{key}.{sub}"
            with pytest.raises(EngineFolderError) as e:
                read_manifest(copy)
            assert key.replace("format_version", "format version") in str(e.value), (name, str(e.value))
            if key in ("profiles", "programs", "model_config", "versions", "build_timings") and sub is not None:
                assert name in str(e.value) or "model_config" in str(e.value), (name, str(e.value))


def test_raised_limits_are_refused(raced_engine, tmp_path):
    """The issue's case: a manifest claiming max_seq_len 4096 on a 32-token engine. Edited alone it differs from
    contract.json; with contract.json and the hashes forged too, the limits compiled into the packages refuse it."""
    engine, _, _ = raced_engine
    copy = _copy(engine, tmp_path / "raised")
    _edit(copy, lambda m: {**m, "profiles": {**m["profiles"], "max_seq_len": 4096},
                           "paged_kv": {**m["paged_kv"], "max_pages_per_seq": -(-4096 // m["paged_kv"]["page_size"])}})
    with pytest.raises(EngineFolderError, match=r"profiles\.max_seq_len; the manifest was edited"):
        Engine.load(copy)
    forged = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, forged)  # rewrites contract.json and every hash, as a determined editor could
    assert read_manifest(copy)["profiles"]["max_seq_len"] == 4096
    with pytest.raises(EngineFolderError, match="max_seq_len: manifest 4096, program 32"):
        Engine.load(copy)
    for key, value in (("max_batch", 8), ("max_input_len", 16)):
        copy2 = _copy(engine, tmp_path / key)
        write_manifest(copy2, {**forged, "profiles": {**json.loads((engine / "manifest.json").read_text())["profiles"],
                                                      key: value}})
        with pytest.raises(EngineFolderError, match=f"{key}: manifest {value}, program"):
            Engine.load(copy2)


def test_files_must_cover_the_folder(raced_engine, tmp_path):
    engine, _, _ = raced_engine
    copy = _copy(engine, tmp_path / "files")
    _edit(copy, lambda m: {**m, "files": {}})
    with pytest.raises(EngineFolderError, match="prefill program file prefill.pt2 is not listed"):
        read_manifest(copy, verify_files=False)
    _edit(copy, lambda m: {**m, "files": {k: v for k, v in json.loads((engine / "manifest.json").read_text())
                                          ["files"].items() if k.startswith(("prefill", "decode"))}})
    with pytest.raises(EngineFolderError, match="contract.json is not listed"):
        read_manifest(copy)
    shutil.copy(engine / "manifest.json", copy / "manifest.json")
    (copy / "extra.bin").write_bytes(b"not built here")
    with pytest.raises(EngineFolderError, match="does not list: extra.bin"):
        read_manifest(copy)
    (copy / "extra.bin").unlink()
    (copy / CONTRACT_NAME).write_text("{}")
    with pytest.raises(EngineFolderError, match="contract.json does not match its hash"):
        read_manifest(copy)
    with pytest.raises(EngineFolderError, match="contract.json: unreadable or damaged"):
        read_manifest(copy, verify_files=False)


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"\xff\xfe{}", "manifest.json: not UTF-8"),
    (b'{"format_version": 2', "manifest.json: not valid JSON"),
    (b'{"format_version": true}', "engine format version True"),
])
def test_malformed_manifests_name_the_file(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(EngineFolderError, match=message):
        read_manifest(tmp_path)


def test_manifest_field_types_are_checked(raced_engine, tmp_path):
    engine, _, _ = raced_engine
    copy = _copy(engine, tmp_path / "types")
    cases = [
        (lambda m: {**m, "profiles": {"max_batch": 2}}, "profiles has no 'max_input_len'"),
        (lambda m: {**m, "profiles": [2, 8, 32]}, "profiles must be an object"),
        (lambda m: {**m, "profiles": {**m["profiles"], "max_seq_len": "32"}}, "profiles.max_seq_len must be an integer"),
        (lambda m: {**m, "state_layout": {"a": 1}}, "state_layout must be a list"),
        (lambda m: {**m, "state_layout": [{**m["state_layout"][0], "shape": ["B", "H"]}]}, "neither a size nor"),
        (lambda m: {**m, "programs": {**m["programs"], "decode": {"file": "../../etc/passwd"}}}, "not a path inside"),
        (lambda m: {**m, "programs": {"prefill": m["programs"]["prefill"]}}, "no 'decode' program"),
        (lambda m: {**m, "model_config": {**m["model_config"], "rope_theta": "big"}}, "model_config: rope_theta"),
        (lambda m: {**m, "device": ["cpu"]}, "malformed device"),
        (lambda m: {**m, "files": {"prefill.pt2": "abc"}}, "not a sha256 hex digest"),
        (lambda m: {k: v for k, v in m.items() if k != "backend"}, "missing field 'backend'"),
    ]
    for edit, message in cases:
        shutil.copy(engine / "manifest.json", copy / "manifest.json")
        _edit(copy, edit)
        with pytest.raises(EngineFolderError, match=message):
            read_manifest(copy)


def test_intact_engine_loads_and_runs(raced_engine):
    engine, _, _ = raced_engine
    aoti = Engine.load(engine)
    assert aoti.max_seq_len == 32
    out = aoti.generate([[5, 6, 7]], max_new_tokens=3)
    assert out.shape == (1, 6)


def test_contract_is_the_manifest_minus_files(raced_engine):
    engine, _, _ = raced_engine
    manifest = json.loads((engine / "manifest.json").read_text())
    contract = json.loads((engine / CONTRACT_NAME).read_text())
    assert contract["manifest"] == canonical_json({k: v for k, v in manifest.items() if k != "files"})


# ------------------------------------------------------------------------------------ items 4 and 6: CLIs, API
@pytest.fixture(scope="module")
def eager():
    model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=1, std=0.1).eval()
    return Engine.from_model(model, 2, 8, 32)


@pytest.mark.parametrize("seed", [2**63, -1, 99999999999999999999999, "3", 1.5, True])
def test_seed_out_of_range_is_refused(eager, seed):
    with pytest.raises(RequestError, match="seed must be an integer in"):
        eager.generate([[5, 6]], max_new_tokens=2, temperature=1.0, seed=seed)
    assert eager.generate([[5, 6]], max_new_tokens=2, temperature=1.0, seed=2**63 - 1).shape == (1, 4)


@pytest.mark.parametrize("argv, message", [
    (["--seed", "99999999999999999999999"], "--seed must be in [0, 2**63 - 1]"),
    (["--seed", "-1"], "--seed must be in"),
    (["--top-p", "0.5"], "give --temperature > 0"),
    (["--top-k", "5", "--temperature", "0"], "give --temperature > 0"),
    (["--temperature", "nan"], "--temperature: temperature must be >= 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--prompt-ids", ""], "the prompt is empty"),
    (["--tokenizer", "/no/such/tokenizer", "--prompt", "hi"], "folder not found"),
    (["--device", "meta"], "engines run on 'cpu' or 'cuda' only"),
    (["--device", "banana"], "'banana' is not a torch device"),
    (["--max-new-tokens", "x"], "invalid int value"),
])
def test_runtime_cli_refusals_exit_2(raced_engine, capsys, argv, message):
    from runtime.__main__ import main

    engine, _, _ = raced_engine
    if "--prompt-ids" not in argv and "--prompt" not in argv:
        argv = ["--prompt-ids", "5,6", *argv]
    assert main([str(engine), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "build.py --device" not in err


def test_runtime_cli_one_new_token_reports_no_nan(raced_engine, capsys):
    from runtime.__main__ import main

    engine, _, _ = raced_engine
    assert main([str(engine), "--prompt-ids", "5,6", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "nan" not in err and "no decode step" in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", ""], "--prompt-ids is empty"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--device", "banana"], "is not a torch device"),
    (["--device", "meta"], "the model runs on cpu or cuda"),
    (["--compare-hf"], "--compare-hf needs --checkpoint"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--max-new-tokens", "100000"], "exceed the model's max_position_embeddings"),
])
def test_model_cli_refusals_exit_2_before_building(caplog, monkeypatch, argv, message):
    from model.__main__ import main

    monkeypatch.setattr(MiniMaxForCausalLM, "__init__", _no_work)
    assert main(["--preset", "tiny", *argv]) == 2
    assert message in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_model_cli_cuda_without_gpu(caplog):
    from model.__main__ import main

    assert main(["--preset", "tiny", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in caplog.text


def test_model_cli_help_points_to_the_architecture_doc(capsys):
    from model.__main__ import main

    assert main(["--help"]) == 0
    assert "docs/architecture.md" in capsys.readouterr().out
    assert (ROOT / "docs" / "architecture.md").is_file()
    assert "../shared" not in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("rope", [5, "default", [1], True])
def test_config_with_malformed_rope_parameters_is_refused(tmp_path, rope, caplog):
    from tests.conftest import hf_tiny_config

    d = hf_tiny_config().to_dict()
    d["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="rope_parameters must be an object"):
        MiniMaxConfig.from_pretrained(tmp_path)
    assert build.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "rope_parameters must be an object" in caplog.text


def test_progress_logs_elapsed_time(caplog):
    caplog.set_level(logging.INFO)
    with progress("lowering test", interval_s=0.05):
        time.sleep(0.2)
    assert "lowering test: still running" in caplog.text


@pytest.mark.parametrize("argv", [
    [str(ROOT / "build.py"), "--preset", "tiny", "--out", ""],
    ["-m", "model", "--preset", "tiny", "--prompt-ids", ""],
    ["-m", "runtime", "/no/such/engine", "--prompt-ids", "5", "--seed", "99999999999999999999999"],
])
def test_cli_processes_exit_2_without_traceback(argv):
    """The real processes (exit status through ``sys.exit(main())``); everything else calls ``main`` in-process."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip()
