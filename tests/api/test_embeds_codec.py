"""prompt_embeds codec: round trips, and every hostile or malformed payload is a
PromptEmbedsError raised before torch builds anything it should not."""

from __future__ import annotations

import base64
import io
import pickle
import random
import re
import struct
import warnings
import zipfile

import pytest
import torch

from api import embeds_codec
from api.embeds_codec import PromptEmbedsError, decode_prompt_embeds, encode_prompt_embeds

H = 8
LIMIT = 1 << 20
EXPECTED = "prompt_embeds must be a torch.save of one dense floating-point tensor"


def decode(data, *, hidden_size=H, dtype=torch.float32, max_bytes=LIMIT):
    return decode_prompt_embeds(data, hidden_size=hidden_size, dtype=dtype, max_bytes=max_bytes)


def saved(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def members(raw: bytes) -> dict[str, bytes]:
    archive = zipfile.ZipFile(io.BytesIO(raw))
    return {info.filename: archive.read(info) for info in archive.infolist()}


def zipped(entries, compression=zipfile.ZIP_STORED) -> bytes:
    """entries: dict or list of (name, bytes) pairs (a list allows duplicate names)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            for name, content in dict(entries).items() if isinstance(entries, dict) else entries:
                archive.writestr(name, content)
    return buffer.getvalue()


def with_pickle(pkl: bytes, storage: bytes = bytes(24)) -> str:
    """A torch.save-shaped archive whose data.pkl is `pkl`."""
    entries = members(saved(torch.zeros(2, 3)))
    entries["archive/data.pkl"] = pkl
    entries["archive/data/0"] = storage
    return b64(zipped(entries))


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _str(value: str) -> bytes:
    return b"X" + struct.pack("<I", len(value)) + value.encode()  # BINUNICODE


def _tuple(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def tensor_pickle(*, numel, size, stride, offset=0, storage="FloatStorage") -> bytes:
    """data.pkl of _rebuild_tensor_v2 written opcode by opcode, so shapes can lie."""
    pid = b"(" + _str("storage") + f"ctorch\n{storage}\n".encode() + _str("0") + _str("cpu")
    pid += _int(numel) + b"tQ"
    hooks = b"ccollections\nOrderedDict\n)R"
    args = b"(" + pid + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89" + hooks + b"t"
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R."


def call_pickle(module: str, name: str, argument: str) -> bytes:
    """data.pkl that calls module.name(argument) when unpickled."""
    return b"\x80\x02" + f"c{module}\n{name}\n".encode() + _str(argument) + b"\x85R."


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_keeps_values_and_casts(dtype):
    tensor = torch.randn(5, H).to(dtype)
    assert torch.equal(decode(encode_prompt_embeds(tensor), dtype=dtype), tensor)
    as_f32 = decode(encode_prompt_embeds(tensor), dtype=torch.float32)
    assert as_f32.dtype == torch.float32 and torch.equal(as_f32, tensor.float())


def test_batch_of_one_is_squeezed():
    tensor = torch.randn(1, 4, H)
    assert torch.equal(decode(encode_prompt_embeds(tensor)), tensor[0])


def test_non_contiguous_view_saved_directly_round_trips():
    base = torch.randn(H, 12)
    view = base[:, 2:6].t()  # (4, H), strides (1, 12), offset 2, storage of 96
    out = decode(b64(saved(view)))
    assert out.is_contiguous() and torch.equal(out, view)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_built_tensor_equals_torch_load_of_the_same_archive(dtype):
    """The tensor is built from the inspected record, not by torch.load: for views with
    offsets, transposes, steps and broadcast (zero) strides, the values are torch.load's."""
    base = torch.randn(3 * H, 20, generator=torch.Generator().manual_seed(1)).to(dtype)
    wide = torch.randn(H, 30, generator=torch.Generator().manual_seed(2)).to(dtype)
    views = [base[2:6, :H], wide[:, 4:10].t(), base[::3, 1:1 + H], base[5, :H].expand(4, H)]
    for view in views:
        raw = saved(view)
        expected = torch.load(io.BytesIO(raw), weights_only=True)
        assert torch.equal(decode(b64(raw), dtype=dtype), expected.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_big_endian_archive_is_swapped_to_this_machines_order(dtype):
    tensor = torch.randn(3, H).to(dtype)
    entries = members(saved(tensor))
    folder = next(iter(entries)).split("/")[0]
    width = tensor.element_size()
    record = entries[f"{folder}/data/0"]
    entries[f"{folder}/data/0"] = b"".join(record[i:i + width][::-1] for i in range(0, len(record), width))
    entries[f"{folder}/byteorder"] = b"big"
    assert torch.equal(decode(b64(zipped(entries)), dtype=dtype), tensor)


def test_archive_without_byteorder_record_is_little_endian():
    tensor = torch.randn(2, H)
    entries = {name: data for name, data in members(saved(tensor)).items() if not name.endswith("/byteorder")}
    assert torch.equal(decode(b64(zipped(entries))), tensor)


def test_rejects_an_unknown_byteorder():
    entries = members(saved(torch.randn(2, H)))
    folder = next(iter(entries)).split("/")[0]
    entries[f"{folder}/byteorder"] = b"middle"
    with pytest.raises(PromptEmbedsError, match="byteorder record is b'middle'"):
        decode(b64(zipped(entries)))


def test_hand_written_pickle_matches_torch_save():
    values = torch.arange(6, dtype=torch.float32)
    pkl = tensor_pickle(numel=6, size=(2, 3), stride=(3, 1))
    data = with_pickle(pkl, values.numpy().tobytes())
    assert torch.equal(decode(data, hidden_size=3), values.reshape(2, 3))


@pytest.mark.parametrize("data", [b"abcd", None, 5, ["abcd"]])
def test_rejects_non_string(data):
    with pytest.raises(PromptEmbedsError, match="must be a base64 string"):
        decode(data)


def test_oversize_text_is_rejected_before_decoding(monkeypatch):
    calls = []
    monkeypatch.setattr(embeds_codec, "_b64decode", lambda *a, **k: calls.append(a))
    with pytest.raises(PromptEmbedsError, match="limit is 1024 decoded bytes"):
        decode("A" * 50_000_000, max_bytes=1024)
    assert calls == []


def test_size_limit_is_exact_on_decoded_bytes():
    raw = saved(torch.randn(2, H))
    assert decode(b64(raw), max_bytes=len(raw)).shape == (2, H)
    with pytest.raises(PromptEmbedsError, match=f"limit is {len(raw) - 1}"):
        decode(b64(raw), max_bytes=len(raw) - 1)


@pytest.mark.parametrize("mangle", [
    lambda s: s + "!",
    lambda s: " " + s,
    lambda s: s + "\n",
    lambda s: s[:76] + "\n" + s[76:],  # MIME line wrapping
    lambda s: s.replace("+", "-").replace("/", "_") if ("+" in s or "/" in s) else s + "-",
    lambda s: s.rstrip("=")[:-1],  # bad padding
    lambda s: s[:10] + "é" + s[10:],
])
@pytest.mark.parametrize("decoder", ["installed", "standard library"])
def test_rejects_anything_but_strict_standard_base64(mangle, decoder, monkeypatch):
    if decoder == "standard library":  # the fallback where pybase64 is not installed
        monkeypatch.setattr(embeds_codec, "_b64decode", base64.b64decode)
    with pytest.raises(PromptEmbedsError, match="standard base64"):
        decode(mangle(encode_prompt_embeds(torch.randn(3, H))))


def test_the_fast_decoder_is_used_and_agrees_with_the_standard_library(monkeypatch):
    import pybase64  # a dependency in pyproject.toml

    assert embeds_codec._b64decode is pybase64.b64decode
    tensor = torch.randn(33, H)
    fast = decode(encode_prompt_embeds(tensor))
    assert embeds_codec.slow_base64_warning() is None
    monkeypatch.setattr(embeds_codec, "_b64decode", base64.b64decode)
    assert torch.equal(fast, decode(encode_prompt_embeds(tensor)))
    # Without pybase64 a server with prompt_embeds on says so in its replica's log.
    assert "pip install pybase64" in embeds_codec.slow_base64_warning()


# Seeded: the same bytes, and so the same test ids, on every collection of the suite.
_RANDOM = random.Random(0)


@pytest.mark.parametrize("raw", [b"", _RANDOM.randbytes(1000), b"PK\x03\x04" + _RANDOM.randbytes(300)],
                         ids=["empty", "random", "zip magic, then random"])
def test_rejects_bytes_that_are_not_a_zip(raw):
    with pytest.raises(PromptEmbedsError, match="not a readable torch.save zip archive"):
        decode(b64(raw))


def test_rejects_truncated_zip():
    raw = saved(torch.randn(3, H))
    for cut in (len(raw) // 2, len(raw) - 10):
        with pytest.raises(PromptEmbedsError, match="not a readable"):
            decode(b64(raw[:cut]))


def test_an_archive_saved_without_crc32s_decodes_as_torch_load_reads_it():
    """torch.serialization.set_crc32_options(False) (large saves skip the checksums) writes
    zeros where the CRC-32s go; zipfile refuses those, torch.load does not, nor do we."""
    tensor = torch.randn(5, H)
    torch.serialization.set_crc32_options(False)
    try:
        raw = saved(tensor)
    finally:
        torch.serialization.set_crc32_options(True)
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        members(raw)
    assert torch.equal(decode(b64(raw)), tensor)
    assert torch.equal(decode(b64(raw)), torch.load(io.BytesIO(raw), weights_only=True))


def test_rejects_a_member_whose_local_header_disagrees_with_the_directory():
    """zipfile's own check: the name in a member's local header is the central
    directory's, so no entry of the directory reads another member's bytes."""
    raw = bytearray(saved(torch.randn(3, H)))
    at = raw.index(b"archive/data.pkl")  # the first: data.pkl's local header
    raw[at:at + len(b"archive/data.pkl")] = b"archive/data.pkx"
    with pytest.raises(PromptEmbedsError, match="not a readable.*differ"):
        decode(b64(bytes(raw)))


def test_rejects_a_member_whose_directory_size_runs_past_the_archive():
    raw = bytearray(saved(torch.randn(3, H)))
    record = zipfile.ZipFile(io.BytesIO(bytes(raw))).getinfo("archive/data/0")
    at = raw.rindex(b"PK\x01\x02", 0, raw.rindex(b"archive/data/0"))  # its central directory entry
    struct.pack_into("<LL", raw, at + 20, len(raw), len(raw))  # compressed and uncompressed sizes
    assert record.file_size < len(raw)
    with pytest.raises(PromptEmbedsError, match="not a readable.*runs past the archive"):
        decode(b64(bytes(raw)), max_bytes=4 * len(raw))


def test_rejects_legacy_pickle_format():
    raw = saved(torch.randn(3, H), _use_new_zipfile_serialization=False)
    with pytest.raises(PromptEmbedsError, match="legacy"):
        decode(b64(raw))


def test_rejects_zip_bomb_by_declared_size():
    entries = members(saved(torch.randn(3, H)))
    entries["archive/data/0"] = bytes(8 << 20)
    raw = zipped(entries, zipfile.ZIP_DEFLATED)
    assert len(raw) < 256 << 10
    with pytest.raises(PromptEmbedsError, match=r"declares \d+ uncompressed bytes"):
        decode(b64(raw), max_bytes=256 << 10)


def test_rejects_compressed_members():
    raw = zipped(members(saved(torch.randn(3, H))), zipfile.ZIP_DEFLATED)
    with pytest.raises(PromptEmbedsError, match="compressed"):
        decode(b64(raw))


def test_rejects_duplicate_and_unexpected_members():
    entries = members(saved(torch.randn(3, H)))
    evil = call_pickle("os", "system", "true")
    with pytest.raises(PromptEmbedsError, match="duplicate"):
        decode(b64(zipped([*entries.items(), ("archive/data.pkl", evil)])))
    with pytest.raises(PromptEmbedsError, match="unexpected member 'archive/evil.py'"):
        decode(b64(zipped({**entries, "archive/evil.py": b"x"})))


def test_os_system_pickle_is_rejected_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = call_pickle("os", "system", f"touch {marker}")
    pickle.loads(payload)  # the payload is live: plain unpickling runs the command
    assert marker.exists()
    marker.unlink()
    with pytest.raises(PromptEmbedsError, match=f"{EXPECTED}; found os.system"):
        decode(with_pickle(payload))
    assert not marker.exists()


def test_builtins_eval_pickle_is_rejected_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = call_pickle("builtins", "eval", f"open({str(marker)!r}, 'w').close()")
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(PromptEmbedsError, match="found builtins.eval"):
        decode(with_pickle(payload))
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("torch._utils", "_rebuild_wrapper_subclass"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch.storage", "UntypedStorage"),
    ("torch", "load"),
])
def test_rejects_globals_outside_the_allowlist(module, name):
    with pytest.raises(PromptEmbedsError, match=f"found {module}.{name}"):
        decode(with_pickle(call_pickle(module, name, "x")))


def test_rejects_calling_an_allowlisted_storage_type():
    with pytest.raises(PromptEmbedsError, match="found a call to torch.FloatStorage"):
        decode(with_pickle(call_pickle("torch", "FloatStorage", "x")))


def _sparse_coo_out_of_range():
    indices = torch.tensor([[0, 1_000_000], [0, 1_000_000]])
    return torch.sparse_coo_tensor(indices, torch.ones(2), (2, H), check_invariants=False)


@pytest.mark.parametrize("make, reason", [
    (_sparse_coo_out_of_range, "found torch._utils._rebuild_sparse_tensor"),
    (lambda: torch.eye(H).to_sparse_csr(), "found torch._utils._rebuild_sparse_tensor"),
    (lambda: torch.quantize_per_tensor(torch.ones(2, H), 0.1, 0, torch.qint8),
     "found torch._utils._rebuild_qtensor"),
    (lambda: torch.nested.nested_tensor([torch.ones(2, H), torch.ones(1, H)]),
     "found torch._utils._rebuild_nested_tensor"),
    (lambda: torch.nn.Parameter(torch.ones(2, H)), "found torch._utils._rebuild_parameter"),
    (lambda: torch.ones(2, H, dtype=torch.int32), "found torch.IntStorage"),
    (lambda: torch.ones(2, H, dtype=torch.int64), "found torch.LongStorage"),
    (lambda: torch.ones(2, H, dtype=torch.bool), "found torch.BoolStorage"),
    (lambda: torch.ones(2, H, dtype=torch.complex64), "found torch.ComplexFloatStorage"),
    (lambda: torch.ones(2, H, dtype=torch.float8_e4m3fn), "found torch._utils._rebuild_tensor_v3"),
    (lambda: {"embeds": torch.ones(2, H)}, "found pickle opcode EMPTY_DICT"),
    (lambda: [torch.ones(2, H)], "found pickle opcode EMPTY_LIST"),
    (lambda: (torch.ones(2, H),), "the top-level object is tuple"),
    (lambda: (torch.ones(2, H), torch.ones(2, H)), "the top-level object is tuple"),
])
def test_rejects_everything_but_one_dense_float_tensor(make, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR, quantized and nested warn on creation
        payload = b64(saved(make()))
    with pytest.raises(PromptEmbedsError, match=re.escape(f"{EXPECTED}; {reason}")):
        decode(payload)


def test_rejects_pickle_protocol_other_than_torch_default():
    with pytest.raises(PromptEmbedsError, match="pickle protocol 4"):
        decode(b64(saved(torch.ones(2, H), pickle_protocol=4)))


def test_rejects_bytes_after_stop():
    pkl = tensor_pickle(numel=6, size=(2, 3), stride=(3, 1))
    with pytest.raises(PromptEmbedsError, match="after STOP"):
        decode(with_pickle(pkl + b"cos\nsystem\n"), hidden_size=3)


def test_rejects_shape_larger_than_its_storage():
    pkl = tensor_pickle(numel=6, size=(9, 3), stride=(3, 1))
    with pytest.raises(PromptEmbedsError, match="needs 27 elements, but its storage holds 6"):
        decode(with_pickle(pkl), hidden_size=3)
    pkl = tensor_pickle(numel=6, size=(2, 3), stride=(3, 1), offset=1)
    with pytest.raises(PromptEmbedsError, match="at offset 1 needs 7 elements"):
        decode(with_pickle(pkl), hidden_size=3)


def test_rejects_storage_count_that_disagrees_with_its_record():
    pkl = tensor_pickle(numel=100, size=(2, 3), stride=(3, 1))
    with pytest.raises(PromptEmbedsError, match="declares 100 elements of 4 bytes, but its "
                                                 "record holds 24 bytes"):
        decode(with_pickle(pkl), hidden_size=3)


def test_rejects_broadcast_strides_that_would_densify_past_the_limit():
    pkl = tensor_pickle(numel=6, size=(1_000_000, 3), stride=(0, 1))
    with pytest.raises(PromptEmbedsError, match=r"needs 12000000 bytes; the limit is"):
        decode(with_pickle(pkl), hidden_size=3)


@pytest.mark.parametrize("shape", [(3, H + 1), (H,), (2, 3, H), (1, 1, 3, H)])
def test_rejects_wrong_shape_with_expected_shape(shape):
    expected = f"expected shape (seq_len, {H}), got {tuple(shape)}"
    with pytest.raises(PromptEmbedsError, match=re.escape(expected)):
        decode(encode_prompt_embeds(torch.randn(shape)))


def test_rejects_zero_rows():
    with pytest.raises(PromptEmbedsError, match="at least one row"):
        decode(encode_prompt_embeds(torch.zeros(0, H)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_nan_and_inf(bad):
    tensor = torch.randn(3, H)
    tensor[1, 2] = bad
    with pytest.raises(PromptEmbedsError, match="NaN or Inf"):
        decode(encode_prompt_embeds(tensor))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_finite_reads_every_16_bit_pattern_as_isfinite_does(dtype):
    from cluster.prompts import all_finite

    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = torch.isfinite(patterns.float())
    assert 0 < int(finite.sum()) < len(patterns)
    assert [all_finite(patterns[i:i + 1]) for i in range(len(patterns))] == finite.tolist()
    assert all_finite(patterns[finite]) and not all_finite(patterns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lazily_negated_tensor_is_checked_by_its_values(dtype):
    """A tensor whose negation torch has not applied yet (its neg bit set) cannot be viewed
    as integers nor as numpy: validation makes the negation real first."""
    from cluster.prompts import embeds_prompt, validate_prompt_embeds

    rows = torch.randn(3, H)
    lazy = rows._neg_view()
    assert lazy.is_neg()
    checked = validate_prompt_embeds(lazy, H, dtype)
    assert not checked.is_neg() and torch.equal(checked, (-rows).to(dtype))
    assert embeds_prompt(checked, H, dtype).num_tokens == 3
    lazy_nan = torch.full((2, H), float("nan"))._neg_view()
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_prompt_embeds(lazy_nan, H, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_at_the_edges_of_wide_dtypes(dtype):
    from cluster.prompts import all_finite

    info = torch.finfo(dtype)
    edges = torch.tensor([info.max, -info.max, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 4, 0.0, -0.0],
                         dtype=dtype)
    assert all_finite(edges)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    sign_bit = torch.tensor([-0.0], dtype=dtype).view(bits)
    negative_nan = (torch.tensor([float("nan")], dtype=dtype).view(bits) | sign_bit).view(dtype)
    for bad in (torch.tensor([float("nan")], dtype=dtype), torch.tensor([float("inf")], dtype=dtype),
                torch.tensor([-float("inf")], dtype=dtype), negative_nan):
        assert torch.isfinite(bad).tolist() == [False]
        assert not all_finite(torch.cat([edges, bad, edges]))


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_single_bad_value_anywhere_is_found(source, model_dtype):
    """The check is two integer max reductions, vectorized in blocks: a NaN or Inf in the
    first, a middle or the last element (a block's tail) of a tensor is still caught."""
    rows = 129
    for position in (0, rows * H // 2 + 3, rows * H - 1):
        for bad in (float("nan"), float("inf"), -float("inf")):
            tensor = torch.randn(rows, H).to(source)
            tensor.view(-1)[position] = bad
            with pytest.raises(PromptEmbedsError, match="NaN or Inf"):
                decode(encode_prompt_embeds(tensor), dtype=model_dtype)


def test_rejects_values_that_overflow_the_model_dtype():
    with pytest.raises(PromptEmbedsError, match="NaN or Inf"):
        decode(encode_prompt_embeds(torch.full((2, H), 1e30)), dtype=torch.float16)


def test_error_is_a_value_error_naming_its_param():
    with pytest.raises(ValueError) as info:
        decode("!!!!")
    assert info.value.param == "prompt_embeds"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoded_tensor_makes_the_same_prompt_without_a_second_validation(dtype):
    """The server builds its prompt with embeds_prompt (no second pass over the values);
    it equals what the full parse_prompt makes of the same tensor."""
    from cluster.prompts import embeds_prompt, parse_prompt

    original = torch.randn(5, H)
    decoded = decode(encode_prompt_embeds(original), dtype=dtype)
    fast = embeds_prompt(decoded, H, dtype)
    full = parse_prompt({"prompt_embeds": original}, tokenizer=None, vocab_size=10, hidden_size=H,
                        dtype=dtype, enable_prompt_embeds=True)
    assert fast.embeds_dtype == full.embeds_dtype and fast.num_tokens == 5
    assert (fast.prompt_embeds == full.prompt_embeds).all()


@pytest.mark.parametrize("tensor", [torch.ones(3, H + 1), torch.ones(0, H), torch.ones(1, 3, H),
                                    torch.ones(3, H, dtype=torch.float64), torch.ones(H, 3).t()])
def test_embeds_prompt_refuses_a_tensor_that_was_not_validated(tensor):
    from cluster.prompts import embeds_prompt

    with pytest.raises(ValueError, match="validate_prompt_embeds"):
        embeds_prompt(tensor, H, torch.float32)


def test_codec_benchmark_compares_with_the_naive_decode(capsys):
    """scripts/bench_embeds_codec.py runs, and both decodes it times give the same tensor
    (it asserts so before timing)."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_embeds_codec.py"
    rows = runpy.run_path(str(script))["main"](["--shapes", "3x8", "16x64", "--repeats", "3", "--parts"])
    decodes, parts = rows[:2], rows[2:]
    assert [row["shape"] for row in decodes] == [row["shape"] for row in parts] == ["3x8", "16x64"]
    assert all(row["safe_ms"] > 0 and row["naive_ms"] > 0 and row["ratio"] == row["safe_ms"] / row["naive_ms"]
               for row in decodes)
    assert all(row[key] > 0 for row in parts for key in ("json_stdlib_ms", "from_json_ms", "b64_stdlib_ms",
                                                         "pybase64_ms", "isfinite_ms", "aminmax_ms", "bits_ms"))
    out = capsys.readouterr().out
    assert "safe / naive" in out and "pybase64 ms" in out and "from_json ms" in out


def test_codec_benchmark_times_the_check_per_thread_count_and_restores_the_count():
    import runpy
    from pathlib import Path

    before = torch.get_num_threads()
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_embeds_codec.py"
    rows = runpy.run_path(str(script))["main"](["--shapes", "16x64", "--repeats", "2", "--threads", "2", "1"])
    assert [row["threads"] for row in rows[1:]] == [2, 1]
    assert all(row[key] > 0 for row in rows[1:] for key in ("bare_ms", "bare_paused_ms", "checked_ms",
                                                              "checked_paused_ms"))
    assert torch.get_num_threads() == before


def _threads_used_by_check(monkeypatch, tensor, torch_threads: int = 64) -> list[int]:
    """The thread counts validate_prompt_embeds sets, the caller's being torch_threads."""
    from cluster import prompts

    calls = []
    monkeypatch.setattr(prompts.torch, "get_num_threads", lambda: torch_threads)
    monkeypatch.setattr(prompts.torch, "set_num_threads", calls.append)
    prompts.validate_prompt_embeds(tensor, tensor.shape[-1], torch.bfloat16)
    return calls


def test_a_many_core_driver_checks_on_a_few_threads_then_restores_its_count(monkeypatch):
    from cluster.prompts import CHECK_THREADS, ELEMENTS_PER_THREAD

    assert _threads_used_by_check(monkeypatch, torch.ones(128, 4096)) == [CHECK_THREADS, 64]
    assert _threads_used_by_check(monkeypatch, torch.ones(3 * ELEMENTS_PER_THREAD // 1024, 1024)) == [3, 64]
    assert _threads_used_by_check(monkeypatch, torch.ones(4, 1024)) == [1, 64]  # small: one thread


def test_a_few_core_driver_checks_on_one_thread(monkeypatch):
    assert _threads_used_by_check(monkeypatch, torch.ones(128, 4096), torch_threads=16) == [2, 16]
    assert _threads_used_by_check(monkeypatch, torch.ones(128, 4096), torch_threads=4) == [1, 4]
    assert _threads_used_by_check(monkeypatch, torch.ones(128, 4096), torch_threads=1) == []  # nothing to bound


def test_rows_of_several_pieces_are_joined_on_the_checks_threads(monkeypatch):
    """A chat's parts or a mixed prompt's spans are joined on as few threads as their
    check uses (a cat on all of a GPU host's wakes them all); one piece is not copied."""
    from cluster import prompts

    calls = []
    monkeypatch.setattr(prompts.torch, "get_num_threads", lambda: 64)
    monkeypatch.setattr(prompts.torch, "set_num_threads", calls.append)
    pieces = [torch.randn(128, 4096), torch.randn(3, 4096)]
    joined = prompts.concat_rows(pieces)
    assert torch.equal(joined, torch.cat(pieces)) and calls == [prompts.CHECK_THREADS, 64]
    calls.clear()
    assert prompts.concat_rows(pieces[:1]) is pieces[0] and calls == []


def test_the_thread_bound_is_lifted_when_the_check_fails(monkeypatch):
    from cluster import prompts

    calls = []
    monkeypatch.setattr(prompts.torch, "get_num_threads", lambda: 64)
    monkeypatch.setattr(prompts.torch, "set_num_threads", calls.append)
    with pytest.raises(ValueError, match="NaN or Inf"):
        prompts.validate_prompt_embeds(torch.full((4, H), float("nan")), H, torch.float32)
    assert calls == [1, 64]


def test_at_most_torch_threads_bounds_only_the_calling_thread():
    import threading

    from cluster.prompts import at_most_torch_threads

    before, seen = torch.get_num_threads(), {}
    ready, inside, done = threading.Event(), threading.Event(), threading.Event()

    def other():
        torch.get_num_threads()  # a thread's own count is set when it first asks
        ready.set()
        inside.wait()
        seen["other"] = torch.get_num_threads()
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    ready.wait()
    with at_most_torch_threads(1):
        seen["inside"] = torch.get_num_threads()
        inside.set()
        done.wait()
    thread.join()
    assert seen == {"inside": 1, "other": before}
    assert torch.get_num_threads() == before
