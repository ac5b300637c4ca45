"""The runtime (runtime/): ragged batches in the model, greedy and sampled generation through the AOTInductor engine
equal to the eager model token for token (batch 1, ragged, chunked), EOS, streaming, errors, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from export import BuildSettings, EngineFolderError, build_engine
from model import MiniMaxConfig, MiniMaxForCausalLM, MiniMaxState
from runtime import Engine, RequestError, chunk_plan
from kernels.attention.naive import gather_row
from tests.utils import logit_report

# max_input_len 8 < the longest prompts below (chunked prefill); max_seq_len 48 < 64 (the RoPE/KV range matters).
SETTINGS = BuildSettings(backend="aoti", device="cpu", dtype="float32", max_batch=4, max_input_len=8, max_seq_len=48,
                         page_size=8)  # 6 pages of 8 per row, 24 in the pool
V = MiniMaxConfig.preset("tiny").vocab_size


@pytest.fixture(scope="module")
def tiny():
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=5, std=0.1).eval()


@pytest.fixture(scope="module")
def engine_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime_engines") / "tiny"
    build_engine(tiny, SETTINGS, out)  # ~50 s on 2 CPU cores: once per module
    return out


@pytest.fixture(scope="module")
def aoti(engine_dir):
    return Engine.load(engine_dir)


@pytest.fixture(scope="module")
def eager(tiny):
    return Engine.from_model(tiny, SETTINGS.max_batch, SETTINGS.max_input_len, SETTINGS.max_seq_len,
                             page_size=SETTINGS.page_size)


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_by_full_forward(model: MiniMaxForCausalLM, prompt: list[int], n: int) -> list[int]:
    """The definition of greedy decoding: re-run the whole sequence and take the argmax, one row, no state."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------- model: ragged batch
@torch.no_grad()
def test_ragged_prefill_equals_each_row_alone(tiny):
    """Left pads at negative positions change nothing: logits, lightning states and KV slots of the real tokens
    equal those of each row run alone, and decoding on from there gives the same next tokens."""
    lengths, S = [7, 3, 5], 24
    rows = [torch.tensor(r) for r in prompts(lengths, seed=1)]
    L = max(lengths)
    ids = torch.stack([torch.cat([torch.full((L - n,), 0), r]) for r, n in zip(rows, lengths)])
    positions = torch.tensor([n - L for n in lengths])  # -(L - L_b)
    state = tiny.new_state(3, S, page_size=4)
    # Stale KV-cache contents must not matter, NaN included: the kernels read only the positions a row holds. (The
    # lightning state must start at zero; the runtime zeroes it.)
    for t in state.key_cache + state.value_cache:
        t.fill_(float("nan"))
    logits, state = tiny.prefill(ids, state, positions)
    assert torch.isfinite(logits).all()
    next_batched = []
    for b, (row, n) in enumerate(zip(rows, lengths)):
        alone_logits, alone = tiny.prefill(row[None], tiny.new_state(1, S, page_size=4))
        report = logit_report(logits[b:b + 1, L - n:], alone_logits)
        assert report["max_abs"] < 1e-5 and report["top1"] == 1.0, (b, report)
        for got, ref in zip(state.lightning, alone.lightning):
            torch.testing.assert_close(got[b], ref[0], rtol=1e-5, atol=1e-6)
        for got, ref in zip(state.key_cache + state.value_cache, alone.key_cache + alone.value_cache):
            torch.testing.assert_close(gather_row(got, state.block_table[b], n), gather_row(ref, alone.block_table[0], n),
                                       rtol=1e-5, atol=1e-6)
        # decode three tokens from both and compare
        nxt, st1 = alone_logits[:, -1].argmax(-1, keepdim=True), alone
        next_alone = []
        for t in range(3):
            step, st1 = tiny.decode(nxt, torch.tensor([n + t]), st1)
            nxt = step[:, -1].argmax(-1, keepdim=True)
            next_alone.append(int(nxt))
        next_batched.append(next_alone)
    nxt, pos = logits[:, -1].argmax(-1, keepdim=True), torch.tensor(lengths)
    got = []
    for t in range(3):
        step, state = tiny.decode(nxt, pos + t, state)
        nxt = step[:, -1].argmax(-1, keepdim=True)
        got.append(nxt[:, 0])
    assert torch.stack(got, 1).tolist() == next_batched


@torch.no_grad()
def test_pads_leave_the_lightning_state_exactly_zero(tiny):
    ids = torch.tensor([[7, 8, 9, 10]])
    _, state = tiny.prefill(ids, tiny.new_state(1, 16, page_size=4), torch.tensor([-4]))  # all four are pads
    assert all((t == 0).all() for t in state.lightning)
    # pads write nothing into the KV cache
    assert all((k == 0).all() for k in state.key_cache + state.value_cache)
    # a chunk of 2 pads + 3 real tokens writes exactly positions 0..2 (page 0, slots 0..2)
    _, state = tiny.prefill(torch.tensor([[7, 8, 9, 10, 11]]), tiny.new_state(1, 16, page_size=4), torch.tensor([-2]))
    for k in state.key_cache + state.value_cache:
        assert (k[0, :, :3] != 0).any(dim=-1).all() and (k[0, :, 3:] == 0).all() and (k[1:] == 0).all()


def test_chunk_plan():
    assert chunk_plan(20, 8) == [(0, 4), (4, 12), (12, 20)]
    assert chunk_plan(8, 8) == [(0, 8)]
    assert chunk_plan(17, 8) == [(0, 2), (2, 9), (9, 17)]  # a leading single token borrows one
    assert chunk_plan(5, 2) == [(0, 2), (2, 4), (4, 5)]  # max chunk 2: the single token goes last
    assert chunk_plan(1, 8) == [(0, 1)]
    for length in range(1, 40):
        for m in range(2, 10):
            plan = chunk_plan(length, m)
            sizes = [e - s for s, e in plan]
            assert plan[0][0] == 0 and plan[-1][1] == length and all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
            assert all(1 <= s <= m for s in sizes) and all(s >= 2 for s in sizes[:-1])


# ---------------------------------------------------------------------------------------------- eager engine
def test_eager_engine_greedy_is_greedy_by_definition(tiny, eager):
    """Through the runtime (ragged batch, chunked prefill, decode) == re-running each row's full forward."""
    batch = prompts([11, 3, 1, 8], seed=2)  # 11 > max_input_len 8: chunked; 1: a prompt of one token
    out = eager.generate(batch, max_new_tokens=5)
    L = 11
    assert out.shape == (4, L + 5)
    for b, prompt in enumerate(batch):
        assert out[b, L - len(prompt): L].tolist() == prompt
        assert out[b, :L - len(prompt)].eq(0).all()  # left pads, pad id 0 by default
        assert out[b, L:].tolist() == greedy_by_full_forward(tiny, prompt, 5), b


# ---------------------------------------------------------------------------------------------- AOTI == eager
@pytest.mark.parametrize("lengths", [[6], [1], [7, 3, 5], [21], [19, 4, 9, 13]], ids=["batch1", "one-token",
                                                                                    "ragged", "chunked", "ragged-chunked"])
def test_aoti_greedy_equals_eager_token_for_token(aoti, eager, lengths):
    batch = prompts(lengths, seed=sum(lengths))
    n = 12
    ours, ref = aoti.generate(batch, max_new_tokens=n), eager.generate(batch, max_new_tokens=n)
    assert ours.shape == (len(lengths), max(lengths) + n)
    assert torch.equal(ours, ref), (ours, ref)


def test_aoti_logits_track_eager(aoti, eager):
    batch = prompts([19, 4, 9], seed=7)
    for engine in (aoti, eager):
        engine.generate(batch, max_new_tokens=1)
    # the last prefill/decode state of both engines: compare the first decode logits directly
    tok = torch.tensor([[3], [4], [5]])
    pos = torch.tensor([19, 4, 9])
    report = logit_report(aoti.decode(tok, pos)[:, None], eager.decode(tok, pos)[:, None])
    assert report["max_abs"] < 1e-4 and report["top1"] == 1.0, report


def test_seeded_sampling_is_reproducible(aoti, eager):
    batch = prompts([9, 2], seed=3)
    kwargs = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95)
    a = aoti.generate(batch, seed=123, **kwargs)
    assert torch.equal(a, aoti.generate(batch, seed=123, **kwargs))
    assert not torch.equal(a, aoti.generate(batch, seed=124, **kwargs))
    assert torch.equal(a, eager.generate(batch, seed=123, **kwargs))  # same logits, same draws
    greedy = aoti.generate(batch, max_new_tokens=10)
    assert not torch.equal(a, greedy)


def test_eos_stops_rows_and_pads_with_eos(aoti):
    batch = prompts([5, 8, 3], seed=4)
    free = aoti.generate(batch, max_new_tokens=8)
    L = 8
    eos = int(free[1, L + 2])  # row 1 produces this token at step 2
    out = aoti.generate(batch, max_new_tokens=8, eos_token_id=eos)
    for b in range(3):
        row = free[b, L:].tolist()
        stop = row.index(eos) if eos in row else 8
        assert out[b, L:L + stop + 1].tolist() == row[:stop + 1]
        assert out[b, L + stop:].eq(eos).all() or stop == 8
    assert out[1, L + 3:].eq(eos).all()
    # the prompt part is padded with eos when no pad id is given
    assert out[2, : L - 3].eq(eos).all()


def test_stream_yields_the_generated_tokens(aoti):
    batch = prompts([4, 10], seed=5)
    steps = list(aoti.stream(batch, max_new_tokens=6))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), aoti.generate(batch, max_new_tokens=6)[:, 10:])
    assert aoti.stats.decode_steps == 5 and aoti.stats.prefill_chunks == 2 and aoti.stats.prompt_tokens == 14


def test_stream_ends_when_every_row_has_stopped(aoti):
    batch = prompts([4], seed=6)
    free = aoti.generate(batch, max_new_tokens=6)[0, 4:].tolist()
    steps = list(aoti.stream(batch, max_new_tokens=6, eos_token_id=free[1]))
    assert [int(s) for s in steps] == free[: free.index(free[1]) + 1]


def test_tensor_with_attention_mask_equals_ragged_lists(aoti):
    batch = prompts([3, 6], seed=8)
    ids = torch.tensor([[0, 0, 0] + batch[0], batch[1]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = aoti.generate(ids, max_new_tokens=4, attention_mask=mask)
    assert torch.equal(out, aoti.generate(batch, max_new_tokens=4))
    assert torch.equal(aoti.generate(ids[1], max_new_tokens=4), out[1:])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("request_kwargs, message", [
    (dict(input_ids=[[5, 6, V]]), rf"prompt 0: token id {V} at index 2 is outside the vocabulary \[0, {V}\)"),
    (dict(input_ids=[[5], [6, -1]]), r"prompt 1: token id -1 at index 1 is outside the vocabulary"),
    (dict(input_ids=[[5, 6]], max_new_tokens=47), r"reach 49 tokens, past the engine's context length max_seq_len 48"),
    (dict(input_ids=[[1]] * 5), r"batch of 5 prompts exceeds the engine's max_batch 4"),
    (dict(input_ids=[[5], []]), r"prompt 1 is empty"),
    (dict(input_ids=[[5]], max_new_tokens=0), r"max_new_tokens must be an integer >= 1"),
    (dict(input_ids=[[5]], eos_token_id=V), r"eos_token_id 512 is outside the vocabulary"),
    (dict(input_ids=[[5]], temperature=-0.5), r"temperature must be >= 0"),
    (dict(input_ids=[[5]], top_p=2.0), r"top_p must be in"),
    (dict(input_ids=torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]])), r"not left padding"),
    (dict(input_ids=torch.ones(2, 3)), r"input_ids must be an integer tensor"),
    (dict(input_ids="hello"), r"input_ids must be a tensor"),
])
def test_bad_requests_are_refused_and_the_engine_stays_usable(aoti, request_kwargs, message):
    good = prompts([6, 2], seed=9)
    before = aoti.generate(good, max_new_tokens=4)
    kwargs = {"max_new_tokens": 1, **request_kwargs}
    with pytest.raises(RequestError, match=message):
        aoti.generate(**kwargs)
    with pytest.raises(RequestError, match=message):
        aoti.stream(**kwargs)  # refused when called, before the first token
    assert torch.equal(aoti.generate(good, max_new_tokens=4), before)


def test_request_that_exactly_fills_the_context_is_served(aoti, eager):
    batch = prompts([10], seed=10)
    out = aoti.generate(batch, max_new_tokens=SETTINGS.max_seq_len - 10)
    assert out.shape == (1, SETTINGS.max_seq_len)
    assert torch.equal(out, eager.generate(batch, max_new_tokens=SETTINGS.max_seq_len - 10))


def _copy_with_manifest(folder, dest, **changes):
    """A copy whose manifest is rewritten with ``changes`` as a build would write it (contract and hashes too)."""
    from export.engine_folder import write_manifest

    shutil.copytree(folder, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    write_manifest(dest, {**manifest, **changes})
    return dest


def test_engine_folders_that_cannot_run_are_refused(engine_dir, tmp_path):
    with pytest.raises(EngineFolderError, match="engine format version 7"):
        Engine.load(_copy_with_manifest(engine_dir, tmp_path / "v7", format_version=7))
    missing = _copy_with_manifest(engine_dir, tmp_path / "missing")
    (missing / "prefill.pt2").unlink()
    with pytest.raises(EngineFolderError, match="file prefill.pt2 listed in the manifest is missing"):
        Engine.load(missing)
    with pytest.raises(EngineFolderError, match="built for 'cpu' and cannot run on 'cuda'"):
        Engine.load(engine_dir, device="cuda")
    with pytest.raises(EngineFolderError, match="ONNX models, which are inputs for trtexec / TensorRT"):
        Engine.load(_copy_with_manifest(engine_dir, tmp_path / "onnx", backend="onnx"))
    with pytest.raises(EngineFolderError, match="not an engine folder"):
        Engine.load(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_engine_without_gpu_is_refused(engine_dir, tmp_path):
    with pytest.raises(EngineFolderError, match="built for 'cuda' but no CUDA device is available"):
        Engine.load(_copy_with_manifest(engine_dir, tmp_path / "cuda", device="cuda"))


def test_engine_allocates_the_manifest_state(aoti, tiny):
    layout = tiny.config.state_layout(SETTINGS.max_batch, SETTINGS.max_seq_len, dtype="float32", page_size=8)
    assert [list(t.shape) for t in aoti._buffers] == [e["shape"] for e in layout]
    assert all(t.device == aoti.device for t in aoti._buffers)
    assert len(aoti.state) == len(MiniMaxState.allocate(tiny.config, 1, 4).flatten())
    assert aoti.paged_kv == {"page_size": 8, "num_pages": 24, "max_pages_per_seq": 6}


# ---------------------------------------------------------------------------------------------- paged KV cache
def test_pages_are_handed_out_per_row_and_returned(aoti):
    """A request reserves ceil((L_b + new) / page_size) pages per row, distinct across rows; the next request
    starts from a full pool."""
    aoti.generate(prompts([10, 3], seed=20), max_new_tokens=7)  # rows need 17 and 10 positions: 3 + 2 pages
    rows = aoti.pages.rows[:2]
    assert [len(r) for r in rows] == [3, 2] and len(set(rows[0]) | set(rows[1])) == 5
    assert aoti.block_table.tolist() == [r + [0] * (6 - len(r)) for r in rows]
    assert aoti.pages.free_pages == 24 - 5 and aoti.pages.held[:2] == [16, 9]
    aoti.generate(prompts([4], seed=21), max_new_tokens=1)
    assert aoti.pages.free_pages == 24 - 1


def _pools(engine):
    return [t.clone() for t, per_row in zip(engine.state, engine._per_row) if not per_row]


@pytest.mark.parametrize("step, message", [
    (lambda e: e.decode(torch.tensor([[5]]), torch.tensor([3])), "row 0: positions go backwards: the row holds 6"),
    (lambda e: e.decode(torch.tensor([[5]]), torch.tensor([9])), "row 0: positions skip ahead: the row holds 6"),
    (lambda e: e.prefill(torch.tensor([[5, 6]]), torch.tensor([47])), "reaches position 48, past the context length 48"),
])
def test_steps_that_do_not_continue_the_row_are_refused_and_write_nothing(aoti, step, message):
    aoti.reset(1)
    aoti.prefill(torch.tensor([prompts([6], seed=22)[0]]), torch.tensor([0]))
    before = _pools(aoti)
    with pytest.raises(RequestError, match=message):
        step(aoti)
    assert all(torch.equal(a, b) for a, b in zip(before, _pools(aoti)))
    aoti.decode(torch.tensor([[5]]), torch.tensor([6]))  # the row continues where it was
    assert aoti.pages.held[0] == 7


def test_pool_out_of_pages_is_refused_before_any_step(tiny):
    """A pool smaller than full capacity serves what fits and refuses, naming the need and the pool, what
    does not; the engine stays usable."""
    engine = Engine.from_model(tiny, 2, 8, 48, page_size=8, num_pages=6)
    assert engine.generate(prompts([20], seed=23), max_new_tokens=28).shape == (1, 48)  # 6 pages
    with pytest.raises(RequestError, match="pool out of pages: the batch needs 8 pages .* the pool has 6"):
        engine.generate(prompts([20, 9], seed=24), max_new_tokens=13)  # 33 and 22 positions: 5 + 3 pages
    engine.reset(2)
    engine.reserve([40, 8])  # 5 + 1 pages: the pool is empty
    with pytest.raises(RequestError, match="row 1 needs 2 pages for 9 positions; 1 new pages .* 0 of the pool's 6"):
        engine.reserve([40, 9])
    assert [len(r) for r in engine.pages.rows] == [5, 1]
    out = engine.generate(prompts([5, 5], seed=25), max_new_tokens=3)
    assert out.shape == (2, 8)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level Hugging Face tokenizer over ids 0..V-1 ("<unk>" 0, "<eos>" 1, "w2".. "w511")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def test_cli_streams_text_and_reports(engine_dir, tokenizer_dir, aoti, capsys):
    from runtime.__main__ import main
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = "w17 w300 w42 w99 w5 w6 w7 w8 w9 w10"  # 10 tokens > max_input_len: chunked
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == [17, 300, 42, 99, 5, 6, 7, 8, 9, 10]
    expected = aoti.generate([ids], max_new_tokens=7, eos_token_id=1)[0, len(ids):].tolist()
    expected = expected[: expected.index(1)] if 1 in expected else expected
    assert main([str(engine_dir), "--tokenizer", str(tokenizer_dir), "--prompt", prompt,
                 "--max-new-tokens", "7"]) == 0
    out, err = capsys.readouterr()
    assert out == prompt + tok.decode(expected) + "\n"
    assert "prefill" in err and "tokens/s" in err and "peak memory" in err and "MiB peak RSS" in err


def test_cli_prompt_ids_and_seeded_sampling(engine_dir, aoti, capsys):
    from runtime.__main__ import main

    argv = [str(engine_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-k", "20", "--seed", "3", "--eos-token-id", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    expected = aoti.generate([[5, 6, 7]], max_new_tokens=5, temperature=0.8, top_k=20, seed=3, eos_token_id=1)
    new = expected[0, 3:].tolist()
    new = new[: new.index(1)] if 1 in new else new
    assert first == ",".join(map(str, new)) + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "5,600"], "token id 600 at index 1 is outside the vocabulary"),
    (["--prompt-ids", "5,6", "--max-new-tokens", "100"], "past the engine's context length max_seq_len 48"),
    (["--prompt-ids", "5,x"], "--prompt-ids must be comma-separated integers"),
    (["--prompt", "hello"], "--prompt needs --tokenizer"),
    (["--prompt-ids", "5", "--device", "cuda"], "cannot run on 'cuda'"),
    (["--prompt-ids", "5", "--top-p", "0"], "top_p must be in"),
])
def test_cli_bad_requests_exit_2(engine_dir, capsys, argv, message):
    from runtime.__main__ import main

    assert main([str(engine_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_engine_exits_2(tmp_path, capsys):
    from runtime.__main__ import main

    assert main([str(tmp_path / "nothing"), "--prompt-ids", "5"]) == 2
    assert "not an engine folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- weights apart
def _shard(folder):
    return folder / json.loads((folder / "manifest.json").read_text())["weights"]["shards"][0]


def test_programs_hold_no_weights_and_share_one_copy(engine_dir, aoti, tiny):
    """The packages are code only (the weights are the folder's shard); both programs run on one set of tensors,
    which equals the model's."""
    shard_bytes = _shard(engine_dir).stat().st_size
    weight_bytes = sum(t.numel() * t.element_size() for _, t in [*tiny.named_parameters(), *tiny.named_buffers()])
    assert shard_bytes >= weight_bytes
    from safetensors.torch import load_file

    stored = load_file(str(_shard(engine_dir)))
    for name, t in [*tiny.named_parameters(), *tiny.named_buffers()]:
        assert torch.equal(stored[name], t.detach()), name
    import zipfile

    # A package with its constants holds their bytes (in the .so or beside it): look for two weights' raw bytes.
    needles = [stored[n][:4].contiguous().view(torch.uint8).numpy().tobytes() for n in ("lm_head.weight",
                                                                                       "model.embed_tokens.weight")]
    for program in ("prefill.pt2", "decode.pt2"):
        with zipfile.ZipFile(engine_dir / program) as z:
            for member in z.namelist():
                data = z.read(member)
                assert not any(needle in data for needle in needles), (program, member)


def _rewrite_shard(folder, change):
    """Rewrite the folder's shard with ``change(tensors)`` and re-sign the manifest (a determined editor)."""
    from safetensors.torch import load_file, save_file

    from export.engine_folder import write_manifest

    tensors = load_file(str(_shard(folder)))
    save_file(change(tensors), str(_shard(folder)))
    write_manifest(folder, json.loads((folder / "manifest.json").read_text()))


def test_damaged_or_mismatched_weights_are_refused_by_name(engine_dir, tmp_path):
    damaged = _copy_with_manifest(engine_dir, tmp_path / "damaged")
    with open(_shard(damaged), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    with pytest.raises(EngineFolderError, match=r"weights/weights-00001.safetensors: weight shard does not match its hash"):
        Engine.load(damaged)

    missing = _copy_with_manifest(engine_dir, tmp_path / "missing")
    _shard(missing).unlink()
    from export.engine_folder import write_manifest

    write_manifest(missing, json.loads((missing / "manifest.json").read_text()))
    with pytest.raises(EngineFolderError, match=r"weights-00001.safetensors: weight shard is missing"):
        Engine.load(missing)

    dropped = _copy_with_manifest(engine_dir, tmp_path / "dropped")
    _rewrite_shard(dropped, lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    with pytest.raises(EngineFolderError, match=r"weight 'model.norm.weight' is missing from the shard"):
        Engine.load(dropped)

    reshaped = _copy_with_manifest(engine_dir, tmp_path / "reshaped")
    _rewrite_shard(reshaped, lambda t: {**t, "lm_head.weight": t["lm_head.weight"][:-1].contiguous()})
    with pytest.raises(EngineFolderError, match=r"weight 'lm_head.weight' is torch.float32 \[511, 64\], the manifest "
                                                r"says float32 \[512, 64\]"):
        Engine.load(reshaped)

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    tensors = dict(manifest["weights"]["tensors"])
    del tensors["model.layers.0.input_layernorm.weight"]
    unlisted = _copy_with_manifest(engine_dir, tmp_path / "unlisted", weights={**manifest["weights"], "tensors": tensors})
    with pytest.raises(EngineFolderError, match=r"needs constants the folder's weights do not hold: "
                                                r"\['model.model.layers.0.input_layernorm.weight'\]"):
        Engine.load(unlisted)


def test_scheduler_prefix_cache_on_the_aoti_engine(engine_dir, aoti):
    """Shared prefixes through the compiled programs: later requests resume from the cache (snapshots restored into
    the package's state rows, pages shared) with the tokens each gets alone; the pool is whole after a clear."""
    from runtime.scheduler import Scheduler

    sched = Scheduler(Engine.load(engine_dir), token_budget=6, prefix_cache_bytes=1 << 20)
    ps = sched.engine.pages.page_size
    base = prompts([3 * ps + 2], seed=31)[0]
    batch = [base + [7, 8], base[:2 * ps] + [9], base + [7, 8]]
    for p in batch:
        rid = sched.submit(p, 5)
        sched.run_until_idle()
        assert sched.result(rid).tokens == aoti.generate([p], max_new_tokens=5)[0, len(p):].tolist(), rid
    assert sched.cache.hits == 2
    sched.cache.clear()
    assert sched.engine.pages.free_pages == sched.engine.pages.num_pages


def test_scheduler_on_the_aoti_engine_equals_static_batches(engine_dir, aoti):
    """In-flight batching through the compiled programs (rows as batch-1 views, decode on a row prefix): each
    greedy request equals the static engine's result for it alone."""
    from runtime.scheduler import Scheduler

    sched = Scheduler(Engine.load(engine_dir), token_budget=6)
    batch = prompts([9, 2, 17, 5, 12], seed=30)
    new = [6, 9, 4, 12, 3]
    ids = [sched.submit(p, n) for p, n in zip(batch, new)]
    sched.run_until_idle()
    for rid, p, n in zip(ids, batch, new):
        assert sched.result(rid).tokens == aoti.generate([p], max_new_tokens=n)[0, len(p):].tolist(), rid
    assert sched.engine.pages.free_pages == sched.engine.pages.num_pages
