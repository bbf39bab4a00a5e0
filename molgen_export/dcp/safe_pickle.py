"""A pickle reader for files other people write: it builds only what its caller lists and can change nothing.

Python's unpickler hands `find_class`'s answer to opcodes that call it (REDUCE, NEWOBJ) and to BUILD, which sets
state on whatever object is on the stack, a class included (`GLOBAL pathlib PosixPath`, `BUILD` sets class
attributes for the whole process). This reader is its own small interpreter over the opcodes protocol 2-5
pickles of plain data and dataclasses use, and gives the stream no such reach:

- GLOBAL / STACK_GLOBAL look `(module, name)` up through the caller's `resolve`, which answers one of our own
  `Function`, `Class` or `Constant` entries (or None: refused). Nothing is imported, and no real class or
  function is ever on the stack.
- REDUCE calls only a `Function`'s own code (ours), which validates plain arguments and returns a new value.
- NEWOBJ on a `Class` makes one fresh instance (`new()`, no arguments); BUILD gives state only to such a
  fresh instance, once, before it is placed anywhere, through the `Class`'s own `build` (ours). BUILD on
  anything else (a `Function`, a `Constant`, a shared value, an instance already built) is refused.
- APPEND/SETITEM/ADDITEMS fill only lists, dicts and sets this load made, and only until the container is
  placed inside another object: no object is changed once anything refers to it, so the result has no cycles.
- Refused outright: INST, OBJ, NEWOBJ_EX, EXT1/2/4, PERSID (and BINPERSID without the caller's hook),
  out-of-band buffers, protocol 0/1 text opcodes, PROTO anywhere but first, bytes after STOP.
- Bounded: every length prefix must fit in the bytes left (nothing is allocated for bytes that are not
  there), integers have at most `MAX_LONG_BYTES` bytes, objects nest at most `MAX_DEPTH` deep, dict keys and
  set items are hashed at most `MAX_KEY_PARTS` parts deep and at most `MAX_SAME_HASH` of one container may
  share a hash (no crafted slow dicts). The interpreter itself is a loop: it never recurses.

Every refusal is `Refused` (with `kind` and the byte `offset`); callers turn it into their own error.
"""

from __future__ import annotations

import gc
import pickletools
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_DEPTH = 32
"""Deepest nesting of containers and instances (DCP metadata needs 8)."""
MAX_LONG_BYTES = 32
"""Largest LONG1/LONG4 integer, in bytes (DCP offsets and lengths fit in 8)."""
MAX_KEY_PARTS = 256
"""Most parts (tuple items, nested) one dict key or set item may have: bounds the work of hashing it."""
MAX_SAME_HASH = 8
"""Most keys of one dict (or items of one set) that may share one hash value."""

UNSAFE = "unsafe"
"""A refusal of something no writer of plain data produces: an opcode or global that reaches outside, BUILD on
what is not a fresh listed instance, a persistent id, an extension code."""
UNKNOWN = "unknown"
"""A refusal of a global outside the caller's list (`Refused.module` and `.name` say which)."""
FORMAT = "format"
"""A refusal of bytes that are not a well-formed pickle of the listed kinds (truncated, garbage, wrong types)."""


class Refused(Exception):
    """The pickle is refused. `kind` is UNSAFE, UNKNOWN or FORMAT; `offset` the byte of the opcode."""

    def __init__(self, kind: str, message: str, offset: int | None = None, module: str | None = None,
                 name: str | None = None, internal: bool = False):
        super().__init__(message)
        self.kind = kind
        self.internal = internal
        """True when an exception of ours (not of the input) was turned into this refusal: a bug to report."""
        self.message = message
        self.offset = offset
        self.module = module
        self.name = name

    def __str__(self) -> str:
        return self.message if self.offset is None else f"{self.message} (byte {self.offset})"


@dataclass(frozen=True)
class Function:
    """A global REDUCE may call: `call(*args)` is the caller's own code, validating plain arguments and returning a
    new object (or an immutable shared one such as an enum member).

    With `container` set ("dict", "set" or "frozenset") the reader itself makes the object with `call()` and
    fills it from the single list argument (pairs for "dict"), checking every key; such a dict or set may then
    be filled further by SETITEMS/ADDITEMS like one the stream made.
    """

    name: str
    call: Callable
    container: str | None = None


@dataclass(frozen=True)
class Class:
    """A global NEWOBJ may instantiate: `new()` returns a fresh instance; BUILD then passes it and the plain state
    to `build(instance, state)` (the caller's own code), once."""

    name: str
    new: Callable[[], object]
    build: Callable[[object, object], None]


@dataclass(frozen=True)
class Constant:
    """A global that stands for one immutable value (e.g. a dtype); GLOBAL pushes the value itself."""

    name: str
    value: object


Spec = Function | Class | Constant
Resolver = Callable[[str, str], "Spec | None"]

_ATOMS = frozenset((str, bytes, int, float, bool, type(None)))


def _op_name(code: int) -> str:
    op = pickletools.code2op.get(chr(code))
    return op.name if op is not None else f"0x{code:02x}"


_REFUSED_OPCODES = {
    **{code: UNSAFE for code in b"io\x92\x82\x83\x84P\x97\x98"},  # INST OBJ NEWOBJ_EX EXT1/2/4 PERSID buffers
    **{code: FORMAT for code in b"ILFSUVTdlgpU2\x96"},  # protocol 0/1 text opcodes, py2 strings, DUP, BYTEARRAY8
}


class _Reader:
    def __init__(self, data: bytes, resolve: Resolver, persistent_load: Callable[[object], object] | None):
        self.data = data
        self.resolve = resolve
        self.persistent_load = persistent_load
        self.pos = 0
        self.limit = len(data)
        self.frame_end: int | None = None
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, object] = {}
        self.alive: list = []
        """Every container and instance made, so that no id below is ever reused during the load."""
        self.depth: dict[int, int] = {}
        self.open: dict[int, object] = {}
        """Containers and fresh instances nothing refers to yet: the only objects the stream may still change."""
        self.fresh: dict[int, Class] = {}
        """Instances NEWOBJ made that BUILD has not given state yet."""
        self.instances: set[int] = set()
        """Every instance NEWOBJ made (hashed by their fields when used as keys)."""
        self.hashes: dict[int, dict[int, int]] = {}
        self.op_start = 0

    # -- errors and bytes ------------------------------------------------------------------------------------

    def refuse(self, kind: str, message: str, **kwargs) -> Refused:
        return Refused(kind, message, self.op_start, **kwargs)

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n > self.limit - pos:
            where = "its frame" if self.frame_end is not None else "the file"
            raise self.refuse(FORMAT, f"truncated: {_op_name(self.data[self.op_start])} needs {n} bytes, "
                                      f"{where} has {self.limit - pos} left")
        self.pos = pos + n
        return self.data[pos:pos + n]

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.limit)
        if end < 0:
            raise self.refuse(FORMAT, "truncated: GLOBAL name without its end of line")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.refuse(FORMAT, "GLOBAL name is not UTF-8") from exc

    # -- the object graph ------------------------------------------------------------------------------------

    def pop(self) -> object:
        if not self.stack:
            raise self.refuse(FORMAT, f"{_op_name(self.data[self.op_start])} on an empty stack")
        return self.stack.pop()

    def top(self) -> object:
        if not self.stack:
            raise self.refuse(FORMAT, f"{_op_name(self.data[self.op_start])} on an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise self.refuse(FORMAT, f"{_op_name(self.data[self.op_start])} without a MARK")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def made(self, obj: object, depth: int, mutable: bool) -> object:
        """Register a new container or instance of nesting `depth`."""
        if depth > MAX_DEPTH:
            raise self.refuse(FORMAT, f"objects nested more than {MAX_DEPTH} deep")
        self.alive.append(obj)
        if depth:
            self.depth[id(obj)] = depth
        if mutable:
            self.open[id(obj)] = obj
        return obj

    def place(self, items) -> int:
        """`items` become parts of another object: nothing may change them from now on. Returns their depth."""
        deepest = 0
        depth_of, close = self.depth.get, self.open.pop
        for item in items:
            if type(item) not in _ATOMS:
                key = id(item)
                close(key, None)
                d = depth_of(key, 0)
                if d > deepest:
                    deepest = d
        return deepest

    def target(self, kinds: tuple[type, ...]) -> object:
        obj = self.top()
        if type(obj) not in kinds or self.open.get(id(obj)) is not obj:
            what = "a container something already holds" if type(obj) in kinds else f"a {type(obj).__name__}"
            raise self.refuse(UNSAFE, f"{_op_name(self.data[self.op_start])} on {what}: only a list, dict or set "
                                      "this pickle made, and nothing holds yet, may be filled")
        return obj

    def grow(self, container: object, depth: int) -> None:
        if depth + 1 > self.depth.get(id(container), 1):
            if depth + 1 > MAX_DEPTH:
                raise self.refuse(FORMAT, f"objects nested more than {MAX_DEPTH} deep")
            self.depth[id(container)] = depth + 1

    def check_key(self, key: object, container: object) -> None:
        """Refuse unhashable keys, keys that take long to hash and keys crafted to share one hash."""
        if type(key) is str:  # randomized, cached hash: nothing to bound
            return
        todo, parts = [key], 0
        while todo:
            part = todo.pop()
            parts += 1
            if parts > MAX_KEY_PARTS:
                raise self.refuse(FORMAT, f"a dict key or set item of more than {MAX_KEY_PARTS} parts")
            if type(part) in _ATOMS or type(part) is frozenset:
                continue
            if isinstance(part, tuple):
                todo.extend(part)
            elif id(part) in self.instances:
                todo.extend(vars(part).values())  # an instance made here (e.g. MetadataIndex): hashed by fields
        try:
            value = hash(key)
        except Exception as exc:  # noqa: BLE001 - a list, or an instance BUILD has not given its fields yet
            raise self.refuse(FORMAT, f"unhashable {type(key).__name__} as a dict key or set item") from exc
        counts = self.hashes.setdefault(id(container), {})
        count = counts.get(value, 0) + 1
        if count > MAX_SAME_HASH:
            raise self.refuse(FORMAT, f"more than {MAX_SAME_HASH} keys of one dict or set share a hash value")
        counts[value] = count

    def set_items(self, container, items: list, depth: int) -> None:
        """Fill `container` from `items` (key, value, ...), placed already (`place`) and `depth` deep."""
        if len(items) % 2:
            raise self.refuse(FORMAT, "SETITEMS with an odd number of items")
        self.grow(container, depth)
        for i in range(0, len(items), 2):
            if type(items[i]) is not str:  # str keys: randomized, cached hashes, nothing to check
                self.check_key(items[i], container)
            try:
                container[items[i]] = items[i + 1]
            except Exception as exc:  # noqa: BLE001 - keys of one hash compared: an instance without its fields
                raise self.refuse(FORMAT, f"a dict key that cannot be compared ({type(exc).__name__})") from exc

    def add_items(self, container, items, depth: int) -> None:
        self.grow(container, depth)
        for item in items:
            self.check_key(item, container)
            try:
                container.add(item)
            except Exception as exc:  # noqa: BLE001 - as in set_items
                raise self.refuse(FORMAT, f"a set item that cannot be compared ({type(exc).__name__})") from exc

    # -- opcodes -----------------------------------------------------------------------------------------------

    def run(self) -> object:
        data = self.data
        if not data or data[0] != 0x80:
            raise Refused(FORMAT, "not a protocol 2+ pickle (no PROTO opcode first)", 0)
        dispatch = [self.dispatch.get(code) for code in range(256)]
        op_stop = _Reader.op_stop
        memo, missing, end, unpack_from, atoms = self.memo, object(), len(data), struct.unpack_from, _ATOMS
        # The loop runs once per opcode (2 million for a 235B step): the state it touches is held in locals, and
        # the most frequent opcodes are done inline while their bytes are all there and their checks pass. Each
        # does what its handler does, checks in the same order; on anything unusual it leaves the state as it
        # found it (or changed only idempotently: `place` again closes nothing new) and falls through to the
        # handler, which reports what is wrong. `self.stack`, `.pos` and `.limit` are synced around handlers.
        metastack, fresh, instances, depth, open_ = self.metastack, self.fresh, self.instances, self.depth, self.open
        alive_append, depth_get, open_get, open_pop = self.alive.append, self.depth.get, self.open.get, self.open.pop
        stack, pos, limit = self.stack, self.pos, self.limit
        try:
            while True:
                if pos >= limit:
                    if self.frame_end is not None:  # the frame ends here (nothing reads past `limit`)
                        self.frame_end, self.limit = None, end
                        limit = end
                    if pos >= limit:
                        self.op_start = pos
                        raise self.refuse(FORMAT, "truncated: the pickle ends before its STOP opcode")
                code = data[pos]
                if code == 0x94:  # MEMOIZE
                    if stack:
                        memo[len(memo)] = stack[-1]
                        pos += 1
                        continue
                elif code == 0x6a:  # LONG_BINGET
                    if pos + 5 <= limit:
                        value = memo.get(unpack_from("<I", data, pos + 1)[0], missing)
                        if value is not missing:
                            stack.append(value)
                            pos += 5
                            continue
                elif code == 0x68:  # BINGET
                    if pos + 2 <= limit:
                        value = memo.get(data[pos + 1], missing)
                        if value is not missing:
                            stack.append(value)
                            pos += 2
                            continue
                elif code == 0x29:  # EMPTY_TUPLE
                    if pos + 1 < limit and data[pos + 1] == 0x81 and stack and type(stack[-1]) is Class:
                        cls = stack[-1]  # EMPTY_TUPLE NEWOBJ, as a pickler writes an instance: done as NEWOBJ is
                        obj = cls.new()
                        key = id(obj)
                        fresh[key] = cls
                        instances.add(key)
                        alive_append(obj)
                        depth[key] = 1
                        open_[key] = obj
                        stack[-1] = obj
                        pos += 2
                        if pos < limit and data[pos] == 0x94:  # and the MEMOIZE that follows most new objects
                            memo[len(memo)] = obj
                            pos += 1
                        continue
                    stack.append(())
                    pos += 1
                    continue
                elif code == 0x4b:  # BININT1
                    if pos + 2 <= limit:
                        stack.append(data[pos + 1])
                        pos += 2
                        continue
                elif code == 0x81:  # NEWOBJ: a fresh instance of a listed class, open for its one BUILD
                    if len(stack) >= 2:
                        cls, args = stack[-2], stack[-1]
                        if type(cls) is Class and type(args) is tuple and not args:
                            del stack[-2:]
                            obj = cls.new()
                            key = id(obj)
                            fresh[key] = cls
                            instances.add(key)
                            alive_append(obj)
                            depth[key] = 1
                            open_[key] = obj
                            stack.append(obj)
                            pos += 1
                            if pos < limit and data[pos] == 0x94:  # and the MEMOIZE that follows most new objects
                                memo[len(memo)] = obj
                                pos += 1
                            continue
                elif code == 0x85:  # TUPLE1
                    if stack:
                        item = stack[-1]
                        deepest = 0
                        if type(item) not in atoms:
                            key = id(item)
                            open_pop(key, None)
                            deepest = depth_get(key, 0)
                        if deepest < MAX_DEPTH:
                            value = (item,)
                            stack[-1] = value
                            alive_append(value)
                            depth[id(value)] = deepest + 1
                            pos += 1
                            if pos < limit and data[pos] == 0x94:  # and the MEMOIZE that follows most new objects
                                memo[len(memo)] = value
                                pos += 1
                            continue
                elif code == 0x28:  # MARK
                    metastack.append(stack)
                    stack = []
                    pos += 1
                    continue
                elif code == 0x75:  # SETITEMS: items placed first, then the target checked (nothing goes into itself)
                    if metastack:
                        deepest, str_keys = 0, True
                        for item in stack[::2]:
                            if type(item) is not str:
                                str_keys = False
                                if type(item) not in atoms:
                                    key = id(item)
                                    open_pop(key, None)
                                    d = depth_get(key, 0)
                                    if d > deepest:
                                        deepest = d
                        for item in stack[1::2]:
                            if type(item) not in atoms:
                                key = id(item)
                                open_pop(key, None)
                                d = depth_get(key, 0)
                                if d > deepest:
                                    deepest = d
                        outer = metastack[-1]
                        if outer and not len(stack) % 2:
                            target = outer[-1]
                            if type(target) is dict and open_get(id(target)) is target:
                                items, stack = stack, metastack.pop()
                                if deepest + 1 > depth_get(id(target), 1):
                                    if deepest + 1 > MAX_DEPTH:
                                        self.op_start = pos
                                        raise self.refuse(FORMAT, f"objects nested more than {MAX_DEPTH} deep")
                                    depth[id(target)] = deepest + 1
                                if str_keys:  # randomized, cached hashes: nothing to check, nothing can raise
                                    target.update(zip(items[::2], items[1::2]))
                                else:
                                    self.op_start = pos
                                    self.set_items(target, items, deepest)
                                pos += 1
                                continue
                elif code == 0x7d:  # EMPTY_DICT
                    value = {}
                    key = id(value)
                    alive_append(value)
                    depth[key] = 1
                    open_[key] = value
                    stack.append(value)
                    pos += 1
                    if pos < limit and data[pos] == 0x94:  # and the MEMOIZE that follows most new objects
                        memo[len(memo)] = value
                        pos += 1
                    continue
                elif code == 0x62:  # BUILD: state placed first, then only a fresh, open instance takes it
                    if len(stack) >= 2:
                        obj, state = stack[-2], stack[-1]
                        deepest = 0
                        if type(state) not in atoms:
                            key = id(state)
                            open_pop(key, None)
                            deepest = depth_get(key, 0)
                        key = id(obj)
                        cls = fresh.get(key)
                        if cls is not None and open_get(key) is obj:
                            stack.pop()
                            del fresh[key]
                            if deepest + 1 > depth_get(key, 1):
                                if deepest + 1 > MAX_DEPTH:
                                    self.op_start = pos
                                    raise self.refuse(FORMAT, f"objects nested more than {MAX_DEPTH} deep")
                                depth[key] = deepest + 1
                            try:
                                cls.build(obj, state)
                            except Refused:
                                raise
                            except Exception as exc:  # the caller's validators raise on state of the wrong shape
                                self.op_start = pos
                                raise self.refuse(FORMAT, f"`{cls.name}` refuses its state "
                                                          f"({type(exc).__name__}: {exc})") from exc
                            pos += 1
                            continue
                elif code == 0x52:  # REDUCE of a plain (not a container) Function
                    if len(stack) >= 2:
                        func, args = stack[-2], stack[-1]
                        if type(func) is Function and func.container is None and type(args) is tuple:
                            del stack[-2:]
                            for item in args:
                                if type(item) not in atoms:
                                    open_pop(id(item), None)
                            try:
                                value = func.call(*args)
                            except Refused:
                                raise
                            except Exception as exc:  # the caller's validators raise on hostile arguments
                                self.op_start = pos
                                raise self.refuse(FORMAT, f"`{func.name}` refuses its arguments "
                                                          f"({type(exc).__name__}: {exc})") from exc
                            if isinstance(value, tuple) and value:  # e.g. torch.Size: as deep as what it holds
                                deepest = 0
                                for item in value:
                                    if type(item) not in atoms:
                                        key = id(item)
                                        open_pop(key, None)
                                        d = depth_get(key, 0)
                                        if d > deepest:
                                            deepest = d
                                if deepest + 1 > MAX_DEPTH:
                                    self.op_start = pos
                                    raise self.refuse(FORMAT, f"objects nested more than {MAX_DEPTH} deep")
                                alive_append(value)
                                depth[id(value)] = deepest + 1
                            stack.append(value)
                            pos += 1
                            if pos < limit and data[pos] == 0x94:  # and the MEMOIZE that follows most new objects
                                memo[len(memo)] = value
                                pos += 1
                            continue
                elif code == 0x4d:  # BININT2
                    if pos + 3 <= limit:
                        stack.append(data[pos + 1] | data[pos + 2] << 8)
                        pos += 3
                        continue
                elif code == 0x8c:  # SHORT_BINUNICODE
                    if pos + 2 <= limit:
                        stop = pos + 2 + data[pos + 1]
                        if stop <= limit:
                            try:
                                stack.append(data[pos + 2:stop].decode("utf-8", "surrogatepass"))
                                pos = stop
                                continue
                            except UnicodeDecodeError:
                                pass
                elif code == 0x86 or code == 0x87:  # TUPLE2, TUPLE3
                    n = code - 0x84
                    if len(stack) >= n:
                        value = tuple(stack[-n:])
                        deepest = 0
                        for item in value:
                            if type(item) not in atoms:
                                key = id(item)
                                open_pop(key, None)
                                d = depth_get(key, 0)
                                if d > deepest:
                                    deepest = d
                        if deepest < MAX_DEPTH:
                            del stack[-n:]
                            alive_append(value)
                            depth[id(value)] = deepest + 1
                            stack.append(value)
                            pos += 1
                            if pos < limit and data[pos] == 0x94:  # and the MEMOIZE that follows most new objects
                                memo[len(memo)] = value
                                pos += 1
                            continue
                elif code == 0x4a:  # BININT
                    if pos + 5 <= limit:
                        stack.append(unpack_from("<i", data, pos + 1)[0])
                        pos += 5
                        continue
                elif code == 0x8a:  # LONG1
                    if pos + 2 <= limit:
                        stop = pos + 2 + data[pos + 1]
                        if data[pos + 1] <= MAX_LONG_BYTES and stop <= limit:
                            stack.append(int.from_bytes(data[pos + 2:stop], "little", signed=True))
                            pos = stop
                            continue
                elif code == 0x4e:  # NONE
                    stack.append(None)
                    pos += 1
                    continue
                elif code == 0x89 or code == 0x88:  # NEWFALSE, NEWTRUE
                    stack.append(code == 0x88)
                    pos += 1
                    continue
                self.op_start = pos
                self.pos = pos + 1
                self.stack = stack
                handler = dispatch[code]
                if handler is None:
                    kind = _REFUSED_OPCODES.get(code, FORMAT)
                    what = "an opcode no DCP writer uses" if kind == UNSAFE else "not an opcode of protocol 2+ data"
                    raise self.refuse(kind, f"opcode {_op_name(code)}: {what}")
                if handler is op_stop:
                    return self.op_stop()
                handler(self)
                stack, pos, limit = self.stack, self.pos, self.limit
        except BaseException:
            self.op_start = pos  # where an unexpected error (ours, or MemoryError) happened, for `load` to say
            raise

    def op_proto(self) -> None:
        version = self.take(1)[0]
        if self.op_start != 0:
            raise self.refuse(FORMAT, "PROTO after the start: two pickles in one file")
        if not 2 <= version <= 5:
            raise self.refuse(FORMAT, f"pickle protocol {version}")

    def op_frame(self) -> None:
        (n,) = struct.unpack("<Q", self.take(8))
        if self.frame_end is not None:
            raise self.refuse(FORMAT, "a FRAME starts before the current frame ends")
        if n > len(self.data) - self.pos:
            raise self.refuse(FORMAT, f"truncated: a FRAME of {n} bytes, {len(self.data) - self.pos} left")
        self.frame_end = self.limit = self.pos + n

    def op_stop(self) -> object:
        if self.metastack:
            raise self.refuse(FORMAT, "STOP inside a MARK")
        if len(self.stack) != 1:
            raise self.refuse(FORMAT, f"STOP with {len(self.stack)} objects on the stack")
        if self.pos != len(self.data):
            raise self.refuse(FORMAT, f"{len(self.data) - self.pos} bytes after the end of the pickle")
        return self.stack[0]

    def op_mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_pop(self) -> None:
        self.pop()

    def op_pop_mark(self) -> None:
        self.pop_mark()

    def push_const(value):
        def op(self) -> None:
            self.stack.append(value)
        return op

    op_none, op_true, op_false = push_const(None), push_const(True), push_const(False)

    def op_binint(self) -> None:
        self.stack.append(struct.unpack("<i", self.take(4))[0])

    def op_binint1(self) -> None:
        self.stack.append(self.take(1)[0])

    def op_binint2(self) -> None:
        self.stack.append(struct.unpack("<H", self.take(2))[0])

    def long(fmt: str):
        size = struct.calcsize(fmt)

        def op(self) -> None:
            (n,) = struct.unpack(fmt, self.take(size))
            if not 0 <= n <= MAX_LONG_BYTES:
                raise self.refuse(FORMAT, f"an integer of {n} bytes (at most {MAX_LONG_BYTES})")
            self.stack.append(int.from_bytes(self.take(n), "little", signed=True))
        return op

    op_long1, op_long4 = long("<B"), long("<i")

    def op_binfloat(self) -> None:
        self.stack.append(struct.unpack(">d", self.take(8))[0])

    def text(fmt: str):
        size = struct.calcsize(fmt)

        def op(self) -> None:
            (n,) = struct.unpack(fmt, self.take(size))
            raw = self.take(n)
            try:
                self.stack.append(raw.decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError as exc:
                raise self.refuse(FORMAT, "a string that is not UTF-8") from exc
        return op

    op_short_binunicode, op_binunicode, op_binunicode8 = text("<B"), text("<I"), text("<Q")

    def raw_bytes(fmt: str):
        size = struct.calcsize(fmt)

        def op(self) -> None:
            (n,) = struct.unpack(fmt, self.take(size))
            self.stack.append(self.take(n))
        return op

    op_short_binbytes, op_binbytes, op_binbytes8 = raw_bytes("<B"), raw_bytes("<I"), raw_bytes("<Q")

    def op_empty_tuple(self) -> None:
        self.stack.append(())

    def tuple_of(n: int):
        def op(self) -> None:
            if len(self.stack) < n:
                raise self.refuse(FORMAT, f"TUPLE{n} with {len(self.stack)} objects on the stack")
            items = tuple(self.stack[-n:])
            del self.stack[-n:]
            self.stack.append(self.made(items, self.place(items) + 1, False))
        return op

    op_tuple1, op_tuple2, op_tuple3 = tuple_of(1), tuple_of(2), tuple_of(3)

    def op_tuple(self) -> None:
        items = tuple(self.pop_mark())
        self.stack.append(self.made(items, self.place(items) + 1, False) if items else ())

    def op_empty_list(self) -> None:
        self.stack.append(self.made([], 1, True))

    def op_empty_dict(self) -> None:
        self.stack.append(self.made({}, 1, True))

    def op_empty_set(self) -> None:
        self.stack.append(self.made(set(), 1, True))

    # Items are placed (sealed) before the target is checked, so that nothing can be put into itself.

    def op_append(self) -> None:
        item = self.pop()
        depth = self.place((item,))
        target = self.target((list,))
        self.grow(target, depth)
        target.append(item)

    def op_appends(self) -> None:
        items = self.pop_mark()
        depth = self.place(items)
        target = self.target((list,))
        self.grow(target, depth)
        target.extend(items)

    def op_setitem(self) -> None:
        value = self.pop()
        items = [self.pop(), value]
        depth = self.place(items)
        self.set_items(self.target((dict, OrderedDict)), items, depth)

    def op_setitems(self) -> None:
        items = self.pop_mark()
        depth = self.place(items)
        self.set_items(self.target((dict, OrderedDict)), items, depth)

    def op_additems(self) -> None:
        items = self.pop_mark()
        depth = self.place(items)
        self.add_items(self.target((set,)), items, depth)

    def op_frozenset(self) -> None:
        items = self.pop_mark()
        probe = self.made(set(), 1, True)
        self.add_items(probe, items, self.place(items))
        self.stack.append(self.made(frozenset(probe), self.depth.get(id(probe), 1), False))

    def op_binput(self) -> None:
        self.memo[self.take(1)[0]] = self.top()

    def op_long_binput(self) -> None:
        self.memo[struct.unpack("<I", self.take(4))[0]] = self.top()

    def op_memoize(self) -> None:
        self.memo[len(self.memo)] = self.top()

    def get(self, index: int) -> None:
        try:
            self.stack.append(self.memo[index])
        except KeyError:
            raise self.refuse(FORMAT, f"memo entry {index} read before it was written") from None

    def op_binget(self) -> None:
        self.get(self.take(1)[0])

    def op_long_binget(self) -> None:
        self.get(struct.unpack("<I", self.take(4))[0])

    def find(self, module: object, name: object) -> None:
        if type(module) is not str or type(name) is not str:
            raise self.refuse(UNSAFE, f"a global named by {type(module).__name__} and {type(name).__name__}, "
                                      "not by two strings")
        spec = self.resolve(module, name)
        if spec is None:
            raise self.refuse(UNKNOWN, f"`{module}.{name}` is not on the list", module=module, name=name)
        self.stack.append(spec.value if isinstance(spec, Constant) else spec)

    def op_global(self) -> None:
        module = self.line()
        self.find(module, self.line())

    def op_stack_global(self) -> None:
        name = self.pop()
        self.find(self.pop(), name)

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.pop()
        if not isinstance(func, Function):
            what = f"class `{func.name}`" if isinstance(func, Class) else f"a {type(func).__name__}"
            raise self.refuse(UNSAFE, f"REDUCE calls {what}; only the listed functions may be called")
        if type(args) is not tuple:
            raise self.refuse(FORMAT, f"REDUCE of `{func.name}` with {type(args).__name__} arguments")
        self.place(args)
        try:
            if func.container is None:
                value = func.call(*args)
            else:
                value, depth = self.fill(func, args)
        except Refused:
            raise
        except Exception as exc:  # the caller's validators raise on hostile arguments
            raise self.refuse(FORMAT, f"`{func.name}` refuses its arguments ({type(exc).__name__}: {exc})") from exc
        if func.container is not None:
            self.stack.append(self.made(value, depth, func.container != "frozenset"))
        elif isinstance(value, tuple) and value:  # e.g. torch.Size: as deep as what it holds
            self.stack.append(self.made(value, self.place(value) + 1, False))
        else:  # plain values, or objects holding nothing from the stream (paths, enum members, layouts)
            self.stack.append(value)

    def fill(self, func: Function, args: tuple) -> tuple[object, int]:
        """A dict, set or frozenset made by `func.call()` and filled from the one list in `args`; and its depth."""
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            raise self.refuse(FORMAT, f"`{func.name}` takes one list")
        items = list(args[0]) if args else []
        if func.container == "dict":
            value = self.made(func.call(), 1, True)
            pairs = []
            for pair in items:
                if type(pair) not in (list, tuple) or len(pair) != 2:
                    raise self.refuse(FORMAT, f"`{func.name}` takes (key, value) pairs")
                pairs.extend(pair)
            self.set_items(value, pairs, self.place(pairs))
            return value, self.depth[id(value)]
        value = self.made(set(), 1, True)
        self.add_items(value, items, self.place(items))
        return (value if func.container == "set" else func.call(value)), self.depth[id(value)]

    def op_newobj(self) -> None:
        args = self.pop()
        cls = self.pop()
        if not isinstance(cls, Class):
            what = f"function `{cls.name}`" if isinstance(cls, Function) else f"a {type(cls).__name__}"
            raise self.refuse(UNSAFE, f"NEWOBJ on {what}; only the listed classes may be instantiated")
        if type(args) is not tuple or args:
            raise self.refuse(FORMAT, f"NEWOBJ of `{cls.name}` with arguments")
        obj = cls.new()
        self.fresh[id(obj)] = cls
        self.instances.add(id(obj))
        self.stack.append(self.made(obj, 1, True))

    def op_build(self) -> None:
        state = self.pop()
        depth = self.place((state,))
        obj = self.top()
        cls = self.fresh.get(id(obj))
        if cls is None or self.open.get(id(obj)) is not obj:
            if isinstance(obj, (Function, Class, Constant)):
                what = f"`{obj.name}` itself"
            elif id(obj) in self.instances:
                what = f"a {type(obj).__name__} that already has its state or is held by another object"
            else:
                what = f"a {type(obj).__name__}"
            raise self.refuse(UNSAFE, f"BUILD on {what}: only a fresh instance of a listed class, before anything "
                                      "holds it, may be given state")
        del self.fresh[id(obj)]
        self.grow(obj, depth)
        try:
            cls.build(obj, state)
        except Refused:
            raise
        except Exception as exc:  # the caller's validators raise on state of the wrong shape
            raise self.refuse(FORMAT, f"`{cls.name}` refuses its state ({type(exc).__name__}: {exc})") from exc

    def op_binpersid(self) -> None:
        pid = self.pop()
        if self.persistent_load is None:
            raise self.refuse(UNSAFE, "a persistent id (BINPERSID): this file has no business with one")
        self.place((pid,))
        try:
            value = self.persistent_load(pid)
        except Refused:
            raise
        except Exception as exc:
            raise self.refuse(UNSAFE, f"persistent id refused ({type(exc).__name__}: {exc})") from exc
        self.stack.append(self.made(value, 1, False))

    dispatch = {
        0x80: op_proto, 0x95: op_frame, ord("."): op_stop, ord("("): op_mark, ord("0"): op_pop,
        ord("1"): op_pop_mark, ord("N"): op_none, 0x88: op_true, 0x89: op_false, ord("J"): op_binint,
        ord("K"): op_binint1, ord("M"): op_binint2, 0x8a: op_long1, 0x8b: op_long4, ord("G"): op_binfloat,
        0x8c: op_short_binunicode, ord("X"): op_binunicode, 0x8d: op_binunicode8, ord("C"): op_short_binbytes,
        ord("B"): op_binbytes, 0x8e: op_binbytes8, ord(")"): op_empty_tuple, 0x85: op_tuple1, 0x86: op_tuple2,
        0x87: op_tuple3, ord("t"): op_tuple, ord("]"): op_empty_list, ord("a"): op_append, ord("e"): op_appends,
        ord("}"): op_empty_dict, ord("s"): op_setitem, ord("u"): op_setitems, 0x8f: op_empty_set,
        0x90: op_additems, 0x91: op_frozenset, ord("q"): op_binput, ord("r"): op_long_binput, 0x94: op_memoize,
        ord("h"): op_binget, ord("j"): op_long_binget, ord("c"): op_global, 0x93: op_stack_global,
        ord("R"): op_reduce, 0x81: op_newobj, ord("b"): op_build, ord("Q"): op_binpersid,
    }
    del push_const, long, text, raw_bytes, tuple_of


class _CollectorPause:
    """Python's cyclic garbage collector off while loads run (on again after the last, if it was on before).

    A load makes hundreds of thousands of containers, and the collector, triggered every 700 of them, rescans
    the heap they grow (its full passes more often as it grows): 40% of a 235B step's load went to it. It could
    free nothing of ours: the reader never changes an object once anything refers to it, so what it builds has
    no cycles. Other threads' cyclic garbage waits the seconds a load takes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads = 0
        self._paused = False

    def __enter__(self) -> None:
        with self._lock:
            if not self._loads:
                self._paused = gc.isenabled()
                if self._paused:
                    gc.disable()
            self._loads += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._loads -= 1
            if not self._loads and self._paused:
                self._paused = False
                gc.enable()


_collector_paused = _CollectorPause()


def load(data: bytes, resolve: Resolver, persistent_load: Callable[[object], object] | None = None) -> object:
    """The object `data` pickles, built only from `resolve`'s entries and plain values.

    Args:
        data: the whole pickle (one; nothing may follow its STOP).
        resolve: `(module, name)` -> our `Function`, `Class` or `Constant` for it, or None to refuse it.
        persistent_load: called with each persistent id (BINPERSID); without it persistent ids are refused.

    Raises:
        Refused: anything else, with its kind and the byte offset of the opcode.
    """
    reader = _Reader(bytes(data), resolve, persistent_load)
    try:
        with _collector_paused:
            return reader.run()
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. MemoryError; our own bugs too: a refusal, never a crash
        raise Refused(FORMAT, f"unexpected {type(exc).__name__}: {exc}", reader.op_start, internal=True) from exc
