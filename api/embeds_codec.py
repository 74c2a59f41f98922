"""Safe decoding of untrusted `prompt_embeds` (base64 of a torch.save zip archive) into a
validated (seq_len, hidden_size) tensor; runs in the Serve ingress, before any shard sees it."""

from __future__ import annotations

import base64
import binascii
import io
import math
import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from cluster.prompts import validate_prompt_embeds

try:  # SIMD base64 (scripts/bench_embeds_codec.py --parts: ~30x the standard library's)
    from pybase64 import b64decode as _b64decode
except ImportError:  # e.g. a machine that has only the standard library's
    from base64 import b64decode as _b64decode


def slow_base64_warning() -> str | None:
    """What a server with prompt_embeds on should log if payloads decode without pybase64
    (a dependency, but an environment can lack it): each embeddings request then spends
    milliseconds more in its replica. None where pybase64 decodes them."""
    if _b64decode.__module__.startswith("pybase64"):
        return None
    return ("pybase64 is not installed: prompt_embeds payloads decode with the standard library's "
            "base64, about 30x slower (pip install pybase64)")

_EXPECTED = "prompt_embeds must be a torch.save of one dense floating-point tensor"
_REBUILD = "torch._utils _rebuild_tensor_v2"
_ORDERED_DICT = "collections OrderedDict"
# torch.save (2.x, including 2.13) names legacy typed storages for these four dtypes.
_STORAGE_DTYPES = {
    "torch FloatStorage": torch.float32,
    "torch HalfStorage": torch.float16,
    "torch BFloat16Storage": torch.bfloat16,
    "torch DoubleStorage": torch.float64,
}
_ALLOWED_GLOBALS = {_REBUILD, _ORDERED_DICT, *_STORAGE_DTYPES}
# Exactly what torch.save (pickle protocol 2) writes for one tensor.
_PUSH_ARG_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "BINUNICODE"}
_CONSTANT_OPS = {"NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_TUPLE_N_OPS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_MEMO_PUT_OPS = {"BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPS = {"BINGET", "LONG_BINGET"}
# Members torch.save writes beside data.pkl and the storage records (data/<key>).
_METADATA_MEMBERS = {"version", ".data/version", "byteorder", ".format_version",
                     ".storage_alignment", ".data/serialization_id"}
_MAX_MEMBERS = 16
_MAX_PICKLE_BYTES = 4096  # a single tensor's data.pkl is ~150 bytes
_MAX_REASON_CHARS = 200
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local file header (zipfile's)
_MARK = object()
_EMPTY_HOOKS = object()  # the OrderedDict() of backward hooks every tensor pickle carries


class PromptEmbedsError(ValueError):
    """A prompt_embeds payload that cannot be accepted; the message says what was expected."""

    param = "prompt_embeds"


@dataclass(frozen=True)
class _Global:
    name: str  # "module qualname", as pickle's GLOBAL opcode writes it


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorSpec:
    """What data.pkl declares, read without building anything."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def encode_prompt_embeds(tensor: torch.Tensor) -> str:
    """base64 of torch.save(tensor): the wire format of the `prompt_embeds` field."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_prompt_embeds(
    data: str, *, hidden_size: int, dtype: torch.dtype, max_bytes: int
) -> torch.Tensor:
    """A validated (seq_len, hidden_size) tensor in `dtype`, or PromptEmbedsError."""
    raw = _decode_base64(data, max_bytes)
    return load_prompt_embeds_bytes(raw, hidden_size=hidden_size, dtype=dtype, max_bytes=max_bytes)


def load_prompt_embeds_bytes(
    raw: bytes, *, hidden_size: int, dtype: torch.dtype, max_bytes: int
) -> torch.Tensor:
    """The same checks on the raw bytes of a torch.save archive (e.g. a `.pt` file)."""
    if len(raw) > max_bytes:
        raise PromptEmbedsError(f"prompt_embeds is {len(raw)} bytes; the limit is {max_bytes}")
    members = _read_members(raw, max_bytes)
    spec = _inspect_pickle(members["data.pkl"])
    _check_spec(spec, members, max_bytes)
    tensor = _build(members, spec)
    try:
        return validate_prompt_embeds(tensor, hidden_size, dtype)
    except ValueError as exc:
        raise PromptEmbedsError(str(exc)) from None


def _decode_base64(data: str, max_bytes: int) -> bytes:
    if not isinstance(data, str):
        raise PromptEmbedsError(
            f"prompt_embeds must be a base64 string, got {type(data).__name__}")
    # Every 4 base64 characters carry 3 bytes: refuse oversized text before decoding it.
    max_chars = 4 * math.ceil(max_bytes / 3)
    if len(data) > max_chars:
        raise PromptEmbedsError(
            f"prompt_embeds is {len(data)} base64 characters (~{len(data) * 3 // 4} bytes); "
            f"the limit is {max_bytes} decoded bytes")
    try:
        raw = _b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PromptEmbedsError(
            f"prompt_embeds must be standard base64 with padding and no whitespace: {exc}"
        ) from None
    if len(raw) > max_bytes:
        raise PromptEmbedsError(
            f"prompt_embeds decodes to {len(raw)} bytes; the limit is {max_bytes}")
    return raw


def _read_members(raw: bytes, max_bytes: int) -> dict[str, bytes | memoryview]:
    """The archive's members keyed by name below the archive folder, after size checks."""
    if raw[:1] == b"\x80":
        raise PromptEmbedsError(
            "prompt_embeds is a legacy (non-zip) torch.save; save with the default "
            "zip format (torch.save(tensor, f))")
    try:
        infos = _checked_infos(zipfile.ZipFile(io.BytesIO(raw)).infolist(), max_bytes)
        view = memoryview(raw)
        members = {name: _stored_bytes(view, info) for name, info in infos.items()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error,
            NotImplementedError, RuntimeError, UnicodeDecodeError) as exc:
        raise PromptEmbedsError(
            f"prompt_embeds is not a readable torch.save zip archive: "
            f"{_bounded(str(exc))}") from None
    # The storage records stay views of `raw` (_build copies the one it reads); the rest is small.
    return {name: data if name.startswith("data/") else data.tobytes() for name, data in members.items()}


def _stored_bytes(raw: memoryview, info: zipfile.ZipInfo) -> memoryview:
    """A stored member's bytes, sliced from the archive without a copy, after its local
    header: the signature, and the name the central directory gave (as zipfile checks).
    CRC-32s are not checked, as torch.load does not: torch.save writes none after
    torch.serialization.set_crc32_options(False). Sizes bound every slice."""
    start = info.header_offset
    header = raw[start:start + _LOCAL_HEADER.size]
    if len(header) != _LOCAL_HEADER.size:
        raise zipfile.BadZipFile(f"truncated local header of {info.filename!r}")
    signature, _, _, flags, *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != zipfile.stringFileHeader:
        raise zipfile.BadZipFile(f"bad local header signature for {info.filename!r}")
    name_start = start + _LOCAL_HEADER.size
    name = raw[name_start:name_start + name_length].tobytes().decode("utf-8" if flags & 0x800 else "cp437")
    if name != info.orig_filename:
        raise zipfile.BadZipFile(f"member name in directory {info.orig_filename!r} and header {name!r} differ")
    data_start = name_start + name_length + extra_length
    if info.compress_size != info.file_size or data_start + info.file_size > len(raw):
        raise zipfile.BadZipFile(f"member {info.filename!r} runs past the archive")
    return raw[data_start:data_start + info.file_size]


def _checked_infos(infos: list[zipfile.ZipInfo], max_bytes: int) -> dict[str, zipfile.ZipInfo]:
    if not 0 < len(infos) <= _MAX_MEMBERS:
        raise PromptEmbedsError(
            f"prompt_embeds archive has {len(infos)} members; torch.save of one tensor "
            f"writes at most {_MAX_MEMBERS}")
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise PromptEmbedsError(
            f"prompt_embeds archive declares {declared} uncompressed bytes; "
            f"the limit is {max_bytes}")
    prefixes = {info.filename.split("/", 1)[0] for info in infos}
    names = [info.filename.partition("/")[2] for info in infos]
    # Two members of one name could let torch read a different data.pkl than we inspect.
    if len(prefixes) != 1 or len(set(names)) != len(names):
        raise PromptEmbedsError(
            "prompt_embeds archive must have one top folder and no duplicate members")
    for name, info in zip(names, infos):
        if name != "data.pkl" and name not in _METADATA_MEMBERS \
                and not re.fullmatch(r"data/\d+", name):
            raise PromptEmbedsError(f"{_EXPECTED}; found unexpected member {info.filename!r}")
        # torch.save stores members uncompressed; compression only serves zip bombs.
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise PromptEmbedsError(
                f"{_EXPECTED}; member {info.filename!r} is compressed or encrypted")
    if "data.pkl" not in names:
        raise PromptEmbedsError(f"{_EXPECTED}; the archive has no data.pkl")
    return dict(zip(names, infos))


def _inspect_pickle(data: bytes) -> _TensorSpec:
    """Interpret data.pkl's opcodes symbolically: nothing is imported or called."""
    if len(data) > _MAX_PICKLE_BYTES:
        raise PromptEmbedsError(
            f"{_EXPECTED}; its data.pkl is {len(data)} bytes, over {_MAX_PICKLE_BYTES}")
    try:
        ops = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]
    except ValueError as exc:
        raise PromptEmbedsError(f"{_EXPECTED}; data.pkl is malformed: {exc}") from None
    if ops[-1][2] != len(data) - 1:
        raise PromptEmbedsError(f"{_EXPECTED}; data.pkl has bytes after STOP")
    stack: list = []
    memo: dict = {}
    for name, arg, _ in ops[:-1]:
        _step(name, arg, stack, memo)
    if len(stack) != 1 or not isinstance(stack[0], _TensorSpec):
        found = type(stack[-1]).__name__ if stack else "nothing"
        raise PromptEmbedsError(f"{_EXPECTED}; the top-level object is {found}")
    return stack[0]


def _step(name: str, arg, stack: list, memo: dict) -> None:
    if name == "PROTO" and arg > 2:
        raise PromptEmbedsError(f"{_EXPECTED}; data.pkl uses pickle protocol {arg}, "
                                "use torch.save's default (2)")
    if name == "PROTO":
        return
    if name in _PUSH_ARG_OPS:
        stack.append(arg)
    elif name in _CONSTANT_OPS:
        stack.append(_CONSTANT_OPS[name])
    elif name == "MARK":
        stack.append(_MARK)
    elif name == "TUPLE":
        items = []
        while (item := _pop(stack, allow_mark=True)) is not _MARK:
            items.append(item)
        stack.append(tuple(reversed(items)))
    elif name in _TUPLE_N_OPS:
        items = [_pop(stack) for _ in range(_TUPLE_N_OPS[name])]
        stack.append(tuple(reversed(items)))
    elif name in _MEMO_PUT_OPS:
        memo[arg] = _pop(stack, keep=True)
    elif name in _MEMO_GET_OPS:
        if arg not in memo:
            raise PromptEmbedsError(f"{_EXPECTED}; data.pkl is malformed (unknown memo {arg})")
        stack.append(memo[arg])
    elif name == "GLOBAL":
        stack.append(_global(arg))
    elif name == "BINPERSID":
        stack.append(_storage(_pop(stack)))
    elif name == "REDUCE":
        args, func = _pop(stack), _pop(stack)
        stack.append(_reduce(func, args))
    else:
        raise PromptEmbedsError(f"{_EXPECTED}; found pickle opcode {name}")


def _pop(stack: list, *, allow_mark: bool = False, keep: bool = False):
    if not stack or (stack[-1] is _MARK and not allow_mark):
        raise PromptEmbedsError(f"{_EXPECTED}; data.pkl is malformed (stack underflow)")
    return stack[-1] if keep else stack.pop()


def _global(name: str) -> _Global:
    if name not in _ALLOWED_GLOBALS:
        raise PromptEmbedsError(f"{_EXPECTED}; found {name.replace(' ', '.')}")
    return _Global(name)


def _storage(pid) -> _Storage:
    """torch's persistent id: ("storage", storage type, key, location, numel)."""
    if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _Global) and pid[1].name in _STORAGE_DTYPES
            and isinstance(pid[2], str) and pid[2].isdigit()
            and isinstance(pid[3], str) and type(pid[4]) is int):
        return _Storage(_STORAGE_DTYPES[pid[1].name], pid[2], pid[4])
    raise PromptEmbedsError(f"{_EXPECTED}; data.pkl has a malformed storage record")


def _reduce(func, args):
    if func == _Global(_ORDERED_DICT) and args == ():
        return _EMPTY_HOOKS
    if func == _Global(_REBUILD):
        return _tensor_spec(args)
    found = func.name.replace(" ", ".") if isinstance(func, _Global) else type(func).__name__
    raise PromptEmbedsError(f"{_EXPECTED}; found a call to {found}")


def _tensor_spec(args) -> _TensorSpec:
    """_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)."""
    if (isinstance(args, tuple) and len(args) == 6 and isinstance(args[0], _Storage)
            and _is_int_tuple((args[1],)) and _is_int_tuple(args[2])
            and _is_int_tuple(args[3]) and isinstance(args[4], bool)
            and args[5] is _EMPTY_HOOKS):
        return _TensorSpec(args[0], args[1], args[2], args[3])
    raise PromptEmbedsError(f"{_EXPECTED}; data.pkl has a malformed tensor record")


def _is_int_tuple(values) -> bool:
    return isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)


def _check_spec(spec: _TensorSpec, members: dict[str, bytes], max_bytes: int) -> None:
    """Bounds the tensor before it is built: storage matches its record, the view fits."""
    storage, itemsize = spec.storage, spec.storage.dtype.itemsize
    records = [name for name in members if name.startswith("data/")]
    if records != [f"data/{storage.key}"]:
        raise PromptEmbedsError(f"{_EXPECTED}; expected one storage record "
                                f"data/{storage.key}, found {records}")
    record_bytes = len(members[records[0]])
    if storage.numel * itemsize != record_bytes:
        raise PromptEmbedsError(
            f"prompt_embeds storage declares {storage.numel} elements of {itemsize} bytes, "
            f"but its record holds {record_bytes} bytes")
    if len(spec.size) != len(spec.stride):
        raise PromptEmbedsError(
            f"prompt_embeds shape {spec.size} and strides {spec.stride} differ in length")
    numel = math.prod(spec.size)
    if numel * itemsize > max_bytes:
        raise PromptEmbedsError(
            f"prompt_embeds shape {spec.size} needs {numel * itemsize} bytes; "
            f"the limit is {max_bytes}")
    needed = 0 if numel == 0 else spec.offset + 1 + sum(
        (n - 1) * s for n, s in zip(spec.size, spec.stride))
    if needed > storage.numel:
        raise PromptEmbedsError(
            f"prompt_embeds shape {spec.size} with strides {spec.stride} at offset "
            f"{spec.offset} needs {needed} elements, but its storage holds {storage.numel}")


def _build(members: dict[str, bytes], spec: _TensorSpec) -> torch.Tensor:
    """The tensor data.pkl declares, built from its storage record's bytes: nothing is
    unpickled and torch.load never runs (1.4 ms for a (128, 4096) float32 tensor, where
    this takes ~0.2). _check_spec has bounded the view by the record."""
    order = members.get("byteorder", b"little")
    if order not in (b"little", b"big"):
        raise PromptEmbedsError(f"{_EXPECTED}; its byteorder record is {_bounded(repr(order))}")
    itemsize = spec.storage.dtype.itemsize
    record = members[f"data/{spec.storage.key}"]
    # Unsigned integers of the element's width carry any float dtype's bytes (numpy has no
    # bfloat16); a big-endian archive is swapped to this machine's order on the way.
    words = np.frombuffer(record, dtype=np.dtype(f"{'>' if order == b'big' else '<'}u{itemsize}"))
    storage = torch.from_numpy(words.astype(f"=u{itemsize}")).view(spec.storage.dtype)
    return storage.as_strided(spec.size, spec.stride, spec.offset)


def _bounded(reason: str) -> str:
    if len(reason) <= _MAX_REASON_CHARS:
        return reason
    return f"{reason[:_MAX_REASON_CHARS]}... ({len(reason) - _MAX_REASON_CHARS} more characters)"
