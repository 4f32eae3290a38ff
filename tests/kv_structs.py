"""The KV-event structs as vLLM 0.33 declares them (``vllm/distributed/
kv_events.py``: same names, field order, types and msgspec options), in
both encodings: events as maps tagged by ``"type"`` (``MAP``), and as
positional arrays (``ARRAY``, how vLLM up to 0.23 encoded them). Tests
publish with these, so what the daemon decodes is byte for byte what an
engine sends."""


from typing import Any

import msgspec

ExternalBlockHash = int | bytes


def _structs(array_like: bool):
    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[ExternalBlockHash]
        parent_block_hash: ExternalBlockHash | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None
        locality: str | None = None
        ownership: str | None = None
        session_id: str | None = None
        lookahead_token_ids: list[list[int]] | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[ExternalBlockHash]
        medium: str | None
        group_idx: int | None = None
        locality: str | None = None
        ownership: str | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]
        data_parallel_rank: int | None = None

    return BlockStored, BlockRemoved, AllBlocksCleared, KVEventBatch


class Encoding:
    def __init__(self, array_like: bool) -> None:
        self.BlockStored, self.BlockRemoved, self.AllBlocksCleared, self.Batch = _structs(array_like)
        self._encode = msgspec.msgpack.Encoder().encode

    def stored(self, hashes, parent, tokens, block_size=16, **kw):
        kw.setdefault("lora_id", None)
        kw.setdefault("medium", "GPU")
        kw.setdefault("lora_name", None)
        return self.BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=[int(t) for t in tokens],
                                block_size=block_size, **kw)

    def removed(self, hashes, medium="GPU", **kw):
        return self.BlockRemoved(block_hashes=list(hashes), medium=medium, **kw)

    def cleared(self):
        return self.AllBlocksCleared()

    def batch(self, events, ts: float = 0.0, rank: int | None = 0) -> bytes:
        return self._encode(self.Batch(ts=ts, events=list(events), data_parallel_rank=rank))


MAP = Encoding(array_like=False)
ARRAY = Encoding(array_like=True)
