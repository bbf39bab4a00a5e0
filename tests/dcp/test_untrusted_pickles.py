"""Crafted pickles in a step folder: each is refused with our error, and nothing in the process changes.

Every case is a file as an attack writes it: a hostile prefix, then the genuine `.metadata` of the step (so a
reader that does not stop at the prefix loads the step as if nothing happened). After each, the `__dict__` of
`pathlib`'s classes, of every DCP metadata class and of the callables we admit is compared with a snapshot,
and a canary file the prefix aims at is checked. The library reader sees every case; a representative case of
each kind goes through the CLI, the dry run, the watcher (`--once`) and `export_step`. Then a seeded fuzz run:
byte flips, truncations and splices of a real `.metadata`, a real `data.pkl` and a real tensor item.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import pickle
import random
import shutil
import struct
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.serialization
from torch.distributed.checkpoint import metadata as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

from molgen_export.dcp import metadata
from molgen_export.dcp import read
from molgen_export.dcp import torch_save_record
from molgen_export.pipeline import export
from molgen_export.dcp import safe_pickle
from molgen_export.cli import main
from molgen_export.errors import CheckpointFormatError, UnsafeCheckpointError
from molgen_export.pipeline.export import export_step

torch.serialization._get_layout("torch.strided")  # torch fills this cache on first use: fill it before snapshots

# -- a small pickle assembler ------------------------------------------------------------------------------


def u(text: str) -> bytes:
    """A string (SHORT_BINUNICODE, or BINUNICODE when long)."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw


def i(value: int) -> bytes:
    """An integer (BININT1, BININT, or LONG1)."""
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return u(module) + u(name) + b"\x93"


def text_glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def lst(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def dct(**items: bytes) -> bytes:
    return b"}(" + b"".join(u(k) + v for k, v in items.items()) + b"u"


def call(module: str, name: str, *args: bytes) -> bytes:
    return glob(module, name) + tup(*args) + b"R"


def slot_state(**attrs: bytes) -> bytes:
    """(None, {attr: value}): BUILD with this sets attributes with setattr (on a class too, in Python's pickle)."""
    return b"N" + dct(**attrs) + b"\x86"


PUT, GET = (lambda n: b"r" + struct.pack("<I", n)), (lambda n: b"j" + struct.pack("<I", n))
FAR = 1 << 30
"""A memo index the genuine metadata never reaches."""
NOT_STRINGS = [b"N", i(1), b"C\x04Size", tup(u("torch")), glob("torch", "Size")]


def after_genuine(prefix: bytes):
    """The attack's layout: PROTO, the hostile prefix, POP what it left, then the genuine pickle (its PROTO dropped)."""
    return lambda genuine: b"\x80\x04" + prefix + b"0" + genuine[2:]


def whole(make):
    return lambda genuine: make(genuine)


# -- the cases -----------------------------------------------------------------------------------------------

DTYPE_KEYS = [("torch", "float32"), ("torch", "bfloat16")]
SPEC_KEYS = sorted(k for k in metadata._metadata_specs() if k[0] != "torch" or k[1] == "Size") + DTYPE_KEYS
CLASS_KEYS = [k for k in SPEC_KEYS if isinstance(metadata._metadata_specs()[k], safe_pickle.Class)]
FUNCTION_KEYS = [k for k in SPEC_KEYS if isinstance(metadata._metadata_specs()[k], safe_pickle.Function)]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: object
    """genuine .metadata bytes -> the crafted file."""
    error: type = CheckpointFormatError
    words: str = ""
    """Words the message must contain (case-insensitive)."""


def _canary_path() -> str:
    return "/tmp/molgen-export-canary-must-not-be-written"


CASES: list[Case] = []
# BUILD on every listed global: Python's pickle would set attributes on the class itself (slot state: setattr)
for module, name in SPEC_KEYS:
    for form, state in (("setattr", slot_state(_str=u(_canary_path()), parent=u("x"))),
                        ("dict", dct(_str=u(_canary_path())))):
        CASES.append(Case(f"BUILD-{form}-on-{module}.{name}", after_genuine(glob(module, name) + state + b"b"),
                          UnsafeCheckpointError, "BUILD on"))
CASES += [
    Case("BUILD-twice", after_genuine(glob(metadata._DCP, "StorageMeta") + b")\x81" + dct(save_id=u("a")) + b"b"
                                      + dct(save_id=u("b")) + b"b"), UnsafeCheckpointError, "already has its state"),
    Case("BUILD-after-it-is-held", after_genuine(glob(metadata._DCP, "StorageMeta") + b")\x81" + PUT(FAR)
                                                 + b"\x850" + GET(FAR) + dct(save_id=u("a")) + b"b"),
         UnsafeCheckpointError, "BUILD on"),
    Case("BUILD-with-itself-as-state", after_genuine(glob(metadata._DCP, "StorageMeta") + b")\x81" + PUT(FAR)
                                                     + GET(FAR) + b"b"), UnsafeCheckpointError, "BUILD on"),
    Case("BUILD-on-a-list", after_genuine(b"]}b"), UnsafeCheckpointError, "BUILD on a list"),
    Case("BUILD-on-a-shared-layout", after_genuine(call("torch.serialization", "_get_layout", u("torch.strided"))
                                                   + dct(x=i(1)) + b"b"), UnsafeCheckpointError, "BUILD on"),
    Case("BUILD-on-a-shared-enum-member", after_genuine(call(metadata._DCP, "_MEM_FORMAT_ENCODING", i(0))
                                                        + dct(x=i(1)) + b"b"), UnsafeCheckpointError, "BUILD on"),
    Case("BUILD-state-naming-__class__", after_genuine(glob(metadata._DCP, "StorageMeta") + b")\x81"
                                                       + dct(__class__=u("x")) + b"b"), words="no field"),
    Case("BUILD-state-naming-__dict__", after_genuine(glob(metadata._DCP, "Metadata") + b")\x81"
                                                      + dct(__dict__=b"}") + b"b"), words="no field"),
    Case("BUILD-state-not-a-dict", after_genuine(glob(metadata._DCP, "Metadata") + b")\x81" + slot_state(x=i(1))
                                                 + b"b"), words="refuses its state"),
    Case("BUILD-TensorProperties-bad-tuple", after_genuine(glob(metadata._DCP, "TensorProperties") + b")\x81"
                                                           + tup(u("a"), u("b"), b"\x89", i(0), b"\x89") + b"b"),
         words="refuses its state"),
]
# REDUCE of every listed callable with hostile arguments
HOSTILE_ARGS = {
    ("torch", "Size"): [tup(u("a")), tup(i(1 << 70)), tup(*[i(1)] * 100), u("x"), b"N", glob("torch", "Size"),
                        tup(i(1)) + tup(i(2))],
    ("torch.serialization", "_get_layout"): [u("torch.nope"), i(1), u("__class__"), b"N"],
    (metadata._DCP, "_MEM_FORMAT_ENCODING"): [i(99), u("0"), b"\x88", b"N"],
    ("collections", "OrderedDict"): [lst(i(1), i(2)), lst(tup(b"]", i(1))), u("pairs"), lst(i(1)) + lst(i(2))],
    ("builtins", "set"): [lst(b"]"), lst(b"}"), u("items")],
    ("builtins", "frozenset"): [lst(b"]"), i(3)],
    ("__builtin__", "set"): [lst(b"]")],
    ("__builtin__", "frozenset"): [lst(b"}")],
}
for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
    HOSTILE_ARGS[("pathlib", name)] = [i(1), u("x" * 5000), u("a\x00b"), u("") * 5000, b"N", glob("torch", "Size")]
assert set(HOSTILE_ARGS) == set(FUNCTION_KEYS), "every listed callable gets hostile arguments"
for (module, name), variants in sorted(HOSTILE_ARGS.items()):
    for n, args in enumerate(variants):
        CASES.append(Case(f"REDUCE-{module}.{name}-{n}", after_genuine(glob(module, name) + b"(" + args + b"tR"),
                          words="refuses its arguments|takes|unhashable"))
for module, name in CLASS_KEYS:
    CASES.append(Case(f"REDUCE-calls-class-{module}.{name}", after_genuine(glob(module, name) + tup(b"}") + b"R"),
                      UnsafeCheckpointError, "REDUCE calls class"))
CASES += [
    Case("REDUCE-calls-a-dtype", after_genuine(glob("torch", "float32") + tup() + b"R"), UnsafeCheckpointError,
         "REDUCE calls"),
    Case("NEWOBJ-on-a-function", after_genuine(glob("torch", "Size") + b")\x81"), UnsafeCheckpointError,
         "NEWOBJ on function"),
    Case("NEWOBJ-with-arguments", after_genuine(glob(metadata._DCP, "Metadata") + tup(b"}") + b"\x81"),
         words="with arguments"),
]
# globals outside the list, by GLOBAL and by STACK_GLOBAL
OUTSIDE = [("builtins", "getattr"), ("builtins", "eval"), ("builtins", "exec"), ("builtins", "__import__"),
           ("builtins", "setattr"), ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"),
           ("_codecs", "encode"), ("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("pickle", "loads"),
           ("torch", "load"), ("torch._utils", "_rebuild_tensor_v2"), ("pathlib", "Path"), ("torch", "Tensor"),
           ("torch.serialization", "_get_layout.cache"), ("torch", "Size.__dict__"),
           (metadata._DCP, "Metadata.__init__"), ("torch.distributed.checkpoint.metadata", "os")]
for module, name in OUTSIDE:
    CASES.append(Case(f"GLOBAL-{module}.{name}", after_genuine(text_glob(module, name) + b"0" + b"N"),
                      UnsafeCheckpointError, "asks to load"))
    CASES.append(Case(f"STACK_GLOBAL-{module}.{name}", after_genuine(glob(module, name)), UnsafeCheckpointError,
                      "asks to load"))
CASES.append(Case("getattr-chain", after_genuine(call("builtins", "getattr", glob("torch", "Size"), u("__dict__"))),
                  UnsafeCheckpointError, "builtins.getattr"))
for n, (module, name) in enumerate([(NOT_STRINGS[a], NOT_STRINGS[b]) for a, b in ((0, 0), (1, 0), (0, 2), (3, 1))]
                                   + [(u("torch"), x) for x in NOT_STRINGS]):
    CASES.append(Case(f"STACK_GLOBAL-not-strings-{n}", after_genuine(module + name + b"\x93"), UnsafeCheckpointError,
                      "not by two strings"))
CASES.append(Case("nested-GLOBALs", after_genuine(glob("torch", "Size") + glob("torch", "Size") + b"\x93"),
                  UnsafeCheckpointError, "not by two strings"))
# opcodes that reach outside plain data, and those of other protocols
for name, raw in [("INST", b"(ios\nsystem\n"), ("OBJ", glob("torch", "Size") + b"(o"),
                  ("NEWOBJ_EX", glob(metadata._DCP, "Metadata") + b")}\x92"), ("EXT1", b"\x82\x01"),
                  ("EXT2", b"\x83\x01\x00"), ("EXT4", b"\x84\x01\x00\x00\x00"), ("PERSID", b"Pstorage\n"),
                  ("BINPERSID", tup(u("storage"), glob("torch", "float32"), u("0"), u("cpu"), i(1)) + b"Q"),
                  ("NEXT_BUFFER", b"\x97"), ("READONLY_BUFFER", b"N\x98")]:
    CASES.append(Case(f"opcode-{name}", after_genuine(raw), UnsafeCheckpointError, "opcode|persistent id"))
for name, raw in [("INT", b"I1\n"), ("STRING", b"S'x'\n"), ("DUP", b"N2"), ("LIST", b"(l"), ("DICT", b"(d"),
                  ("BYTEARRAY8", b"\x96" + struct.pack("<Q", 1) + b"x"), ("PUT", b"Np0\n"), ("unknown-0xff", b"\xff")]:
    CASES.append(Case(f"opcode-{name}", after_genuine(raw), words="opcode"))
# memory: length prefixes far beyond the file
for name, raw in [("BINUNICODE8", b"\x8d" + struct.pack("<Q", 1 << 62)), ("BINUNICODE", b"X" + struct.pack("<I", 2**32 - 1)),
                  ("BINBYTES8", b"\x8e" + struct.pack("<Q", 1 << 62)), ("BINBYTES", b"B" + struct.pack("<I", 2**32 - 1)),
                  ("FRAME", b"\x95" + struct.pack("<Q", 1 << 60))]:
    CASES.append(Case(f"huge-{name}", after_genuine(raw), words="truncated"))
CASES += [
    Case("huge-LONG4", after_genuine(b"\x8b" + struct.pack("<i", 2**31 - 1)), words="integer of"),
    Case("huge-LONG1", after_genuine(b"\x8a\xff" + b"\x01" * 255), words="integer of"),
    Case("huge-negative-LONG4", after_genuine(b"\x8b" + struct.pack("<i", -5)), words="integer of"),
    # recursion: nesting far deeper than any metadata
    Case("deep-lists", after_genuine(b"]" * 100_000 + b"a" * 99_999), words="nested"),
    Case("deep-tuples", after_genuine(b"N" + b"\x85" * 100_000), words="nested"),
    Case("deep-marks", after_genuine(b"(" * 100_000 + b"t" * 100_000), words="nested"),
    Case("deep-frozensets", after_genuine(b"(" * 50_000 + b"\x91" * 50_000), words="nested"),
    Case("deep-dicts", after_genuine(b"}" + (u("k") + b"}") * 50_000 + b"s" * 50_000), words="nested"),
    Case("deep-instances", after_genuine((glob(metadata._DCP, "StorageMeta") + b")\x81}" + u("save_id")) * 2000
                                         + b"N" + b"sb" * 2000), words="nested"),
    Case("unclosed-marks", whole(lambda g: b"\x80\x04" + b"(" * 1_000_000 + b"N."), words="STOP inside a MARK"),
    # the stream itself
    Case("truncated-half", whole(lambda g: g[:len(g) // 2]), words="truncated"),
    Case("truncated-no-STOP", whole(lambda g: g[:-1]), words="truncated"),
    Case("truncated-in-first-frame", whole(lambda g: g[:40]), words="truncated"),
    Case("trailing-bytes", whole(lambda g: g + b"N."), words="bytes after the end"),
    Case("two-pickles", whole(lambda g: g + g), words="bytes after the end"),
    Case("second-PROTO", after_genuine(b"\x80\x04N"), words="PROTO after the start"),
    Case("no-PROTO", whole(lambda g: g[2:]), words="no PROTO"),
    Case("protocol-1", whole(lambda g: b"\x80\x01" + g[2:]), words="protocol 1"),
    Case("memo-read-before-write", after_genuine(GET(FAR)), words="read before it was written"),
    Case("empty-stack", after_genuine(b"R"), words="empty stack"),
    Case("cycle", after_genuine(b"]" + PUT(FAR) + GET(FAR) + b"a"), UnsafeCheckpointError, "APPEND on"),
    Case("cycle-dict", after_genuine(b"}" + PUT(FAR) + u("k") + GET(FAR) + b"s"), UnsafeCheckpointError, "SETITEM on"),
    Case("fill-what-is-held", after_genuine(b"]" + PUT(FAR) + b"\x850" + GET(FAR) + b"Na"), UnsafeCheckpointError,
         "APPEND on a container something already holds"),
    Case("SETITEMS-on-a-str", after_genuine(u("s") + b"(NNu"), UnsafeCheckpointError, "SETITEMS on a str"),
    # slow dicts: keys crafted to share one hash, and keys that take long to hash
    Case("hash-flood", after_genuine(b"}(" + b"".join(i(k * (2**61 - 1)) + b"N" for k in range(1, 100)) + b"u"),
         words="share a hash"),
    Case("slow-key", after_genuine(b"}" + tup(*[i(1)] * 1000) + b"Ns"), words="parts"),
    Case("unhashable-key", after_genuine(b"}]Ns"), words="unhashable"),
    # a well-formed pickle of the wrong things: types checked field by field
    Case("not-Metadata", whole(lambda g: pickle.dumps({"a": 1}, protocol=4)), words="does not hold DCP"),
    Case("storage-offset-a-str", whole(lambda g: _edited(g, lambda info: setattr(info, "offset", "0"))), words="offset"),
    Case("storage-length-negative", whole(lambda g: _edited(g, lambda info: setattr(info, "length", -1))),
         words="length"),
    Case("relative-path-an-int", whole(lambda g: _edited(g, lambda info: setattr(info, "relative_path", 7))),
         words="relative_path"),
    Case("relative-path-absolute", whole(lambda g: _edited(g, lambda info: setattr(info, "relative_path", _canary_path()))),
         UnsafeCheckpointError, "absolute"),
    Case("relative-path-dotdot", whole(lambda g: _edited(g, lambda info: setattr(info, "relative_path", "../x.distcp"))),
         UnsafeCheckpointError, "not a plain file name"),
    Case("missing-field", whole(lambda g: _edited(g, lambda info: delattr(info, "length"))), words="no `length`"),
]


def _edited(genuine: bytes, edit) -> bytes:
    """The genuine metadata, loaded by Python's own unpickler (test-made, trusted bytes), with `edit` applied to every
    storage entry, pickled again."""
    metadata = pickle.loads(genuine)  # noqa: S301 - the genuine file this test session made
    for info in metadata.storage_data.values():
        edit(info)
    return pickle.dumps(metadata, protocol=4)


# -- what must not change ------------------------------------------------------------------------------------

WATCHED = {
    "pathlib.PosixPath": pathlib.PosixPath, "pathlib.PurePath": pathlib.PurePath,
    "pathlib.PurePosixPath": pathlib.PurePosixPath, "pathlib.Path": pathlib.Path,
    "pathlib.PureWindowsPath": pathlib.PureWindowsPath, "pathlib.WindowsPath": pathlib.WindowsPath,
    **{f"dcp.{cls.__name__}": cls for cls in (dcp.Metadata, dcp.TensorStorageMetadata, dcp.BytesStorageMetadata,
                                              dcp.ChunkStorageMetadata, dcp.TensorProperties, dcp.MetadataIndex,
                                              dcp.StorageMeta, dcp._MEM_FORMAT_ENCODING)},
    "filesystem._StorageInfo": _StorageInfo, "torch.Size": torch.Size,
    "torch.serialization._get_layout": torch.serialization._get_layout,
    "torch_save_record._describe_tensor": torch_save_record._describe_tensor, "torch_save_record._storage_ref": torch_save_record._storage_ref,
    "metadata._Record": metadata._Record,
    **{f"spec {m}.{n}": s for (m, n), s in metadata._metadata_specs().items() if m != "torch"},
}


def snapshot() -> dict:
    state = {}
    for name, obj in WATCHED.items():
        state[name] = ({k: id(v) for k, v in vars(obj).items()}, getattr(obj, "__defaults__", None))
    for member in dcp._MEM_FORMAT_ENCODING:
        state[f"enum {member.name}"] = dict(vars(member))
    state["str(Path)"] = str(Path("/etc/hostname")), str(Path("a") / "b"), str(Path("/x/y").parent)
    return state


@pytest.fixture(scope="module")
def genuine(demo_run_session) -> bytes:
    return (demo_run_session.steps[0] / ".metadata").read_bytes()


@pytest.fixture
def step(demo_run_session, tmp_path) -> Path:
    """A private copy of one genuine step folder (not the whole run)."""
    step = tmp_path / "checkpoint" / demo_run_session.steps[0].name
    shutil.copytree(demo_run_session.steps[0], step)
    return step


@pytest.fixture
def canary():
    path = Path(_canary_path())
    path.write_text("canary\n")
    yield path
    assert path.read_text() == "canary\n", "the canary file was written"
    path.unlink()


def test_cases_cover_every_listed_global():
    assert {c.id for c in CASES if c.id.startswith("BUILD-setattr-on-")} == {f"BUILD-setattr-on-{m}.{n}" for m, n in SPEC_KEYS}
    assert len({c.id for c in CASES}) == len(CASES)


def test_genuine_metadata_loads_to_what_torch_loads(genuine, step):
    """Same objects, field for field, as Python's unpickler gives on the genuine bytes; the hint agrees."""
    ours = read.load_metadata_object(step)
    assert _canonical(ours) == _canonical(pickle.loads(genuine))  # noqa: S301 - test-made genuine file
    hint = metadata.model_ranges_hint(step)
    assert hint and hint == sorted((i.relative_path, i.offset, i.length) for k, i in ours.storage_data.items()
                                   if metadata.is_model_key(k.fqn))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crafted_metadata_is_refused_and_changes_nothing(case, genuine, step, canary):
    before = snapshot()
    (step / ".metadata").write_bytes(case.build(genuine))
    with pytest.raises(case.error) as refused:
        read.load_metadata_object(step)
    message = str(refused.value)
    assert str(step) in message and refused.value.hint, message
    assert any(w.lower() in message.lower() for w in case.words.split("|")), message
    assert not _internal(refused.value), message  # a refusal, not a crash of ours turned into one
    with pytest.raises(CheckpointFormatError):
        read.read_step_metadata(step)
    with pytest.raises(CheckpointFormatError):
        read.referenced_files(step)
    assert len(export.source_fingerprint(step)) == 64
    hint = metadata.model_ranges_hint(step)
    assert hint is None or all(metadata.shard_name_problem(name) is None for name, _, _ in hint)
    assert snapshot() == before


ENTRY_CASES = ["BUILD-setattr-on-pathlib.PosixPath", "BUILD-setattr-on-torch.distributed.checkpoint.metadata.Metadata",
               "BUILD-setattr-on-torch.serialization._get_layout", "REDUCE-torch.Size-0", "STACK_GLOBAL-not-strings-0",
               "GLOBAL-copyreg._reconstructor", "opcode-BINPERSID", "huge-BINUNICODE8", "deep-tuples",
               "truncated-half", "cycle", "hash-flood", "relative-path-absolute"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ENTRY_CASES], ids=lambda c: c.id)
def test_crafted_metadata_is_refused_by_every_entry_point(case, genuine, demo_run, canary, capsys):
    """CLI export, dry run, watcher `--once` and `export_step`: exit 2 (the watcher: gave up), nothing published."""
    before = snapshot()
    for step in demo_run.steps:  # every step crafted: the watcher has nothing else to export
        (step / ".metadata").write_bytes(case.build(genuine))
    step = demo_run.steps[0]
    export_root = demo_run.checkpoint_root.parent / f"{demo_run.checkpoint_root.name}-hf"
    assert main(["--dcp-path", str(step), "--skip-logits"]) == 2
    assert main(["--dcp-path", str(step), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count(".metadata") >= 2 and "fix:" in err, err
    assert any(w.lower() in err.lower() for w in case.words.split("|")), err
    with pytest.raises(case.error):
        export_step(step)
    assert main(["watch", str(demo_run.checkpoint_root), "--once", "--retries", "0", "--skip-logits", "-q"]) == 1
    journal = [json.loads(line) for line in (export_root / ".molgen-watch.jsonl").read_text().splitlines()]
    assert {e["status"] for e in journal if "step" in e} == {"gave-up"}, journal
    assert not [p for p in export_root.iterdir() if p.name.endswith("-hf")], list(export_root.iterdir())
    assert snapshot() == before


def test_watcher_refuses_the_poisoned_step_and_exports_the_next_one(genuine, demo_run, canary):
    """The reported attack: a step whose `.metadata` BUILDs `PosixPath._str` (the genuine metadata after it), then
    a genuine step. The watcher used to write its failure record through the poisoned Path, over the canary."""
    before = snapshot()
    poison = after_genuine(glob("pathlib", "PosixPath") + slot_state(_str=u(str(canary))) + b"b")
    (demo_run.steps[0] / ".metadata").write_bytes(poison(genuine))
    export_root = demo_run.checkpoint_root.parent / f"{demo_run.checkpoint_root.name}-hf"
    assert main(["watch", str(demo_run.checkpoint_root), "--once", "--retries", "0", "--skip-logits", "-q"]) == 1
    journal = [json.loads(line) for line in (export_root / ".molgen-watch.jsonl").read_text().splitlines()]
    status = {e["step"]: e["status"] for e in journal if "step" in e}
    assert status == {10: "gave-up", 20: "exported"}, journal
    failure = json.loads((export_root / ".step-10-hf.failed.json").read_text())
    assert failure["error_type"] == "UnsafeCheckpointError" and "BUILD on" in failure["error"]
    assert (export_root / "step-20-hf" / "model.safetensors").is_file()
    assert snapshot() == before


# -- the fuzz run ------------------------------------------------------------------------------------------------

class _ReferenceUnpickler(pickle.Unpickler):
    """Python's unpickler with the old allow-list (real classes): the reference result for bytes *ours accepted*."""

    def find_class(self, module, name):
        spec = metadata._metadata_specs().get((module, name))
        assert spec is not None, (module, name)
        return super().find_class(module, name)


def _canonical(obj, seen=None):
    """A comparable form of an unpickled object: types, every field, containers in order."""
    if isinstance(obj, (dict, OrderedDict)):
        return (type(obj).__name__, tuple((_canonical(k), _canonical(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return (type(obj).__name__, tuple(_canonical(x) for x in items))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__qualname__, tuple((k, _canonical(v)) for k, v in sorted(vars(obj).items())))
    return (type(obj).__name__, repr(obj))


def _mutations(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for n in range(count):
        kind = n % 4
        buf = bytearray(data)
        if kind == 0:  # flip 1-4 bytes
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind == 1:  # truncate
            del buf[rng.randrange(len(buf)):]
        elif kind == 2:  # splice: a slice of the file copied over another place, or moved in
            a, b = sorted(rng.randrange(len(buf)) for _ in range(2))
            piece = bytes(buf[a:b][:rng.randint(1, 64)])
            at = rng.randrange(len(buf))
            buf[at:at + (len(piece) if rng.random() < 0.5 else 0)] = piece
        else:  # delete or duplicate a short range, or insert a random opcode byte
            at = rng.randrange(len(buf))
            choice = rng.random()
            if choice < 0.4:
                del buf[at:at + rng.randint(1, 8)]
            elif choice < 0.7:
                buf[at:at] = buf[at:at + rng.randint(1, 8)]
            else:
                buf[at:at] = bytes([rng.choice(b"bR\x81\x93cQ(t.0ehj\x94")])
        yield kind, bytes(buf)


def _internal(exc: BaseException) -> bool:
    """True when a refusal was made of an exception in our own code (`safe_pickle.Refused.internal`)."""
    while exc is not None:
        if isinstance(exc, safe_pickle.Refused) and exc.internal:
            return True
        exc = exc.__cause__
    return False


def _metadata_outcome(raw: bytes, path: Path, expected) -> str:
    try:
        ours = metadata._parse(raw, path)
    except CheckpointFormatError as exc:
        assert not _internal(exc), str(exc)
        return "refused"
    got = _canonical(ours)
    reference = _canonical(_ReferenceUnpickler(io.BytesIO(raw)).load())  # only bytes ours accepted
    assert got == reference, "ours and Python's unpickler disagree on bytes ours accepted"
    return "identical" if got == expected else "loaded-different"


def _data_pickle_outcome(raw: bytes, expected) -> str:
    try:
        ours = torch_save_record.describe_data_pickle(raw)
    except (torch_save_record.RecordNotUnderstood, UnsafeCheckpointError) as exc:
        assert not _internal(exc), str(exc)
        return "refused"
    return "identical" if ours == expected else "loaded-different"


def _item_outcome(raw: bytes, expected) -> str:
    try:
        record = torch_save_record.locate_tensor(lambda o, n: raw[o:o + n], len(raw))
    except (torch_save_record.RecordNotUnderstood, UnsafeCheckpointError) as exc:
        assert not _internal(exc), str(exc)
        return "refused"
    assert 0 <= record.data_offset and record.data_offset + record.nbytes <= len(raw)
    return "identical" if record == expected else "loaded-different"


FUZZ_CASES = {"metadata": 2000, "data.pkl": 3000, "item": 1500}
FUZZ_SEEDS = {"metadata": 1, "data.pkl": 2, "item": 3}


def test_fuzzed_pickles_load_the_same_or_are_refused(genuine, step, capsys):
    """Seeded mutations of a real `.metadata`, `data.pkl` and tensor item: each loads (to what Python's unpickler
    gives on the same bytes, for `.metadata`) or is refused with our error; never a crash, a hang or a change."""
    meta = read.read_step_metadata(step)
    chunk = min((c for e in meta.model.values() for c in e.chunks), key=lambda c: c.length)
    item = (step / chunk.relative_path).read_bytes()[chunk.file_offset:chunk.file_offset + chunk.length]
    with zipfile.ZipFile(io.BytesIO(item)) as archive:
        data_pkl = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    expected = {"metadata": _canonical(metadata._parse(genuine, step / ".metadata")),
                "data.pkl": torch_save_record.describe_data_pickle(data_pkl),
                "item": torch_save_record.locate_tensor(lambda o, n: item[o:o + n], len(item))}
    run = {"metadata": (genuine, lambda raw: _metadata_outcome(raw, step / ".metadata", expected["metadata"])),
           "data.pkl": (data_pkl, lambda raw: _data_pickle_outcome(raw, expected["data.pkl"])),
           "item": (item, lambda raw: _item_outcome(raw, expected["item"]))}
    for target, (data, outcome_of) in run.items():
        assert outcome_of(data) == "identical", target
    before = snapshot()
    counts: dict[str, dict[str, int]] = {}
    started = time.perf_counter()
    for target, (data, outcome_of) in run.items():
        tally = counts.setdefault(target, {"identical": 0, "loaded-different": 0, "refused": 0})
        slowest = 0.0
        for n, (kind, raw) in enumerate(_mutations(data, FUZZ_CASES[target], seed=FUZZ_SEEDS[target])):
            t0 = time.perf_counter()
            tally[outcome_of(raw)] += 1
            slowest = max(slowest, time.perf_counter() - t0)
            if n % 100 == 0:
                assert snapshot() == before, f"{target} mutation {n} changed a class"
        assert slowest < 5.0, f"a {target} mutation took {slowest:.2f} s"
        tally["slowest_s"] = round(slowest, 4)
    elapsed = time.perf_counter() - started
    assert snapshot() == before
    with capsys.disabled():
        print(f"\nfuzz: {sum(FUZZ_CASES.values())} mutations in {elapsed:.1f} s, crashes 0: "
              + "; ".join(f"{t} {c}" for t, c in counts.items()))
    for target, tally in counts.items():
        assert tally["refused"] > 0 and tally["identical"] + tally["loaded-different"] > 0, (target, tally)
