"""Real atomic memory operations for Numba kernels over shared memory.

This module owns every memory-ordering primitive shmcache uses. Plain NumPy
loads in a Numba kernel are ordinary LLVM loads: LLVM may merge, hoist or
re-order them, which would make a seqlock's re-check of a version word
meaningless. These intrinsics emit LLVM's ``load atomic`` / ``store atomic``
/ ``fence`` / ``cmpxchg`` with an explicit ordering, so the
C++11 memory model (which LLVM implements) gives the guarantees the reader
protocol in ``shmcache.matcher`` relies on. They work with ``cache=True``.

All element accesses take a flat index into a 1-D C-contiguous array and do
no bounds check: callers bound-check indices read from shared memory first.

``load_u64_unaligned`` reads eight little-endian bytes at a byte offset of
any contiguous array; it is how the hash reads its input. ``store_u64_be``
writes eight big-endian bytes at a byte offset: how KV events are encoded. shmcache requires a
little-endian host (x86-64, AArch64), which ``shmcache/__init__.py`` checks.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.np.arrayobj import populate_array
from numba import njit
from numba.extending import intrinsic

__all__ = [
    "load_acquire",
    "load_relaxed",
    "store_release",
    "store_relaxed",
    "fence_acquire",
    "fence_release",
    "fence_seq_cst",
    "cas",
    "fetch_add",
    "load_u64_unaligned",
    "store_u64_be",
    "mul128",
    "prefetch",
    "words_at",
    "weakest_view",
    "as_pairs",
    "hide_data",
    "publish_word",
    "swap_word",
    "read_word",
]


def _element_pointer(context, builder, arrty, arr, idx, idxty):
    ary = context.make_array(arrty)(context, builder, arr)
    index = context.cast(builder, idx, idxty, types.intp)
    return cgutils.get_item_pointer(context, builder, arrty, ary, [index], wraparound=False)


def _alignment(arrty) -> int:
    return arrty.dtype.bitwidth // 8


def _is_flat_int_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(arr.dtype, types.Integer)


def _make_load(ordering: str):
    @intrinsic
    def _load(typingctx, arr, idx):
        if not (_is_flat_int_array(arr) and isinstance(idx, types.Integer)):
            return None
        sig = arr.dtype(arr, idx)

        def codegen(context, builder, signature, args):
            arrty, idxty = signature.args
            ptr = _element_pointer(context, builder, arrty, args[0], args[1], idxty)
            return builder.load_atomic(ptr, ordering, _alignment(arrty))

        return sig, codegen

    return _load


def _make_store(ordering: str):
    @intrinsic
    def _store(typingctx, arr, idx, val):
        if not (_is_flat_int_array(arr) and isinstance(idx, types.Integer) and arr.mutable):
            return None
        sig = types.void(arr, idx, arr.dtype)

        def codegen(context, builder, signature, args):
            arrty, idxty, valty = signature.args
            ptr = _element_pointer(context, builder, arrty, args[0], args[1], idxty)
            builder.store_atomic(args[2], ptr, ordering, _alignment(arrty))
            return context.get_dummy_value()

        return sig, codegen

    return _store


def _make_fence(ordering: str):
    @intrinsic
    def _fence(typingctx):
        sig = types.void()

        def codegen(context, builder, signature, args):
            builder.fence(ordering)
            return context.get_dummy_value()

        return sig, codegen

    return _fence


#: Acquire load: later loads and stores cannot move before it.
load_acquire = _make_load("acquire")
#: Relaxed (LLVM ``monotonic``) load: atomic, no ordering. Fields read between
#: two version loads of a seqlock are read this way so the acquire fence that
#: follows them orders them.
load_relaxed = _make_load("monotonic")
#: Release store: earlier loads and stores cannot move after it.
store_release = _make_store("release")
#: Relaxed store: atomic, unordered; paired with ``fence_release``.
store_relaxed = _make_store("monotonic")
fence_acquire = _make_fence("acquire")
fence_release = _make_fence("release")
#: Full fence: orders earlier stores before later loads (a store-load
#: barrier), which acquire and release cannot. The reader-pin handshake
#: (store a hazard, fence, load the other side's mark) needs it on both sides.
fence_seq_cst = _make_fence("seq_cst")


@intrinsic
def cas(typingctx, arr, idx, expected, new):
    """Sequentially consistent compare-and-swap; returns the value seen."""
    if not (_is_flat_int_array(arr) and isinstance(idx, types.Integer) and arr.mutable):
        return None
    sig = arr.dtype(arr, idx, arr.dtype, arr.dtype)

    def codegen(context, builder, signature, args):
        arrty, idxty, _, _ = signature.args
        ptr = _element_pointer(context, builder, arrty, args[0], args[1], idxty)
        pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return sig, codegen


@intrinsic
def fetch_add(typingctx, arr, idx, delta):
    """Sequentially consistent atomic ``arr[idx] += delta``; returns the old value."""
    if not (_is_flat_int_array(arr) and isinstance(idx, types.Integer) and arr.mutable):
        return None
    sig = arr.dtype(arr, idx, arr.dtype)

    def codegen(context, builder, signature, args):
        arrty, idxty, _ = signature.args
        ptr = _element_pointer(context, builder, arrty, args[0], args[1], idxty)
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def load_u64_unaligned(typingctx, arr, byte_offset):
    """Eight bytes at ``byte_offset`` of a contiguous array, as a host-order uint64."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and isinstance(byte_offset, types.Integer)):
        return None
    sig = types.uint64(arr, byte_offset)

    def codegen(context, builder, signature, args):
        arrty, offty = signature.args
        ary = context.make_array(arrty)(context, builder, args[0])
        base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        off = context.cast(builder, args[1], offty, types.intp)
        ptr = builder.bitcast(builder.gep(base, [off]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)

    return sig, codegen


@intrinsic
def store_u64_be(typingctx, arr, byte_offset, value):
    """Write ``value`` (uint64) as eight big-endian bytes at ``byte_offset``
    of a contiguous byte array, unaligned, in one store: how msgpack's
    big-endian ints are written eight bytes at a time."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype == types.uint8
            and isinstance(byte_offset, types.Integer) and isinstance(value, types.Integer)):
        return None
    sig = types.void(arr, byte_offset, types.uint64)

    def codegen(context, builder, signature, args):
        arrty, offty, _ = signature.args
        ary = context.make_array(arrty)(context, builder, args[0])
        i64 = ir.IntType(64)
        off = context.cast(builder, args[1], offty, types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [off]), i64.as_pointer())
        bswap = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]), "llvm.bswap.i64")
        builder.store(builder.call(bswap, [args[2]]), ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the CPU to bring ``arr[idx]``'s cache line in for reading (never faults)."""
    if not (_is_flat_int_array(arr) and isinstance(idx, types.Integer)):
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        arrty, idxty = signature.args
        ptr = _element_pointer(context, builder, arrty, args[0], args[1], idxty)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def mul128(typingctx, a, b):
    """Full 64x64 -> 128-bit product of two uint64, as (low, high)."""
    if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None
    ret = types.UniTuple(types.uint64, 2)
    sig = ret(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        i128 = ir.IntType(128)
        i64 = ir.IntType(64)
        prod = builder.mul(builder.zext(args[0], i128), builder.zext(args[1], i128))
        lo = builder.trunc(prod, i64)
        hi = builder.trunc(builder.lshr(prod, ir.Constant(i128, 64)), i64)
        return context.make_tuple(builder, ret, (lo, hi))

    return sig, codegen


@intrinsic
def words_at(typingctx, address, n_words):
    """The ``n_words`` uint64 words at ``address`` as a 1-D array (no owner).

    For kernels handed a mapping's address instead of its array (each array
    argument costs about 30 ns a call to type and unbox). The caller
    keeps the mapping alive and passes only addresses it took from a live
    array of at least ``n_words`` words.
    """
    if not (isinstance(address, types.Integer) and isinstance(n_words, types.Integer)):
        return None
    arrty = types.Array(types.uint64, 1, "C")
    sig = arrty(address, n_words)

    def codegen(context, builder, signature, args):
        addr, n = args
        i64 = context.get_value_type(types.intp)
        ary = context.make_array(arrty)(context, builder)
        populate_array(
            ary,
            data=builder.inttoptr(addr, context.get_value_type(types.CPointer(types.uint64))),
            shape=[context.cast(builder, n, signature.args[1], types.intp)],
            strides=[i64(8)],
            itemsize=i64(8),
            meminfo=None,
        )
        return ary._getvalue()

    return sig, codegen


@intrinsic
def weakest_view(typingctx, arr):
    """``arr`` itself, typed read-only and possibly misaligned.

    Every array of the same dtype, dimensions and layout converts to that
    type, so a kernel that is handed only such views compiles once for all
    of them (the key chain's kernel: a minute of compiling per copy).
    """
    if not isinstance(arr, types.Array):
        return None
    weak = types.Array(arr.dtype, arr.ndim, arr.layout, readonly=True, aligned=False)

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, weak, args[0])

    return weak(arr), codegen


@intrinsic
def as_pairs(typingctx, words):
    """The 1-D C-contiguous array ``words`` (``2n`` items) viewed as ``(n, 2)``.

    Unlike ``reshape``, whose result shape comes back from a runtime helper,
    the view's second dimension is a constant LLVM can see, so indexing
    ``[i, j]`` costs no multiply by a loaded row length (measured: 0.03 us of
    a 128-block match, whose walk reads every key this way).
    """
    if not (isinstance(words, types.Array) and words.ndim == 1 and words.layout == "C"):
        return None
    pairs = words.copy(ndim=2)

    def codegen(context, builder, signature, args):
        src = context.make_array(words)(context, builder, args[0])
        dst = context.make_array(pairs)(context, builder)
        intp = context.get_value_type(types.intp)
        item = intp(context.get_abi_sizeof(context.get_data_type(words.dtype)))
        n = builder.udiv(builder.extract_value(src.shape, 0), intp(2))
        populate_array(
            dst,
            data=src.data,
            shape=[n, intp(2)],
            strides=[builder.mul(item, intp(2)), item],
            itemsize=item,
            meminfo=src.meminfo,
            parent=src.parent,
        )
        return impl_ret_borrowed(context, builder, pairs, dst._getvalue())

    return pairs(words), codegen


@intrinsic
def hide_data(typingctx, arr):
    """``arr`` itself, its data pointer passed through an empty asm statement.

    LLVM then cannot tell that the array is constant, so it loads the
    elements from memory instead of folding them into instructions. For a
    table of 64-bit constants read in a hot loop (the XXH3 secret) this is
    cheaper: an immediate costs a separate ``movabs`` per use, a load folds
    into the instruction that consumes it.
    """
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        (arrty,) = signature.args
        ary = context.make_array(arrty)(context, builder, args[0])
        ptr = ary.data
        ary.data = builder.asm(ir.FunctionType(ptr.type, [ptr.type]), "", "=r,0", [ptr], side_effect=False)
        return impl_ret_borrowed(context, builder, arrty, ary._getvalue())

    return arr(arr), codegen


# --- Python-callable wrappers, for the few words Python code touches ---------


@njit(cache=True)
def publish_word(words, index, value):
    """Release-store ``value`` into ``words[index]``."""
    store_release(words, index, value)


@njit(cache=True)
def read_word(words, index):
    """Acquire-load ``words[index]``."""
    return load_acquire(words, index)


@njit(cache=True)
def swap_word(words, index, expected, new):
    """Compare-and-swap ``words[index]`` from ``expected`` to ``new``; True if it swapped."""
    return cas(words, index, expected, new) == expected
