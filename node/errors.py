"""Errors raised by the node; protocol adapters map them to their own error shapes at the edge.

NodeError
├── ConfigError           a setting out of range or unknown (also a ValueError)
├── ModelSpecError        a model spec that names nothing loadable
├── ModelImportError      a GGUF file that cannot be converted
├── CheckpointError       a checkpoint that cannot be trusted
│   ├── CheckpointCorrupt        digest, size or structure mismatch
│   ├── CheckpointModelMismatch  written by another model or tokenizer
│   ├── CheckpointVersionError   an unknown format version
│   ├── CacheLocked              another process serves this cache folder
│   └── BlockStoreUnavailable    a block's rest is in the shared store, which cannot be reached
├── MemoryBudgetExceeded  a request whose KV cache cannot fit the memory budget
├── DiskBudgetExceeded    a context that cannot fit the disk budget
├── InvalidAgentId        an agent id that is not safe to use
├── PromptTooLong         a prompt beyond the model's or the node's limit
├── WorkerDead            the thread that owns the model has died
├── InvalidRegistration   a registry request with a bad body (also a ValueError)
├── PeerFailure           one attempt at a peer produced no answer; `outcome` says how
└── BenchError            a bench measurement could not be taken
"""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(NodeError, ValueError):
    pass


class ModelSpecError(NodeError):
    pass


class ModelImportError(NodeError):
    pass


class CheckpointError(NodeError):
    pass


class CheckpointCorrupt(CheckpointError):
    pass


class CheckpointModelMismatch(CheckpointError):
    pass


class CheckpointVersionError(CheckpointError):
    pass


class CacheLocked(CheckpointError):
    """Another process holds the cache folder's lock (it serves those agents)."""


class BlockStoreUnavailable(CheckpointError):
    """A read needs the rest of a partial block (pulled heads-first from the shared block store)
    and the store does not answer: retry later; nothing is lost or set aside."""


class MemoryBudgetExceeded(NodeError):
    """A request's KV cache cannot fit the memory budget, even with every idle agent evicted."""


class DiskBudgetExceeded(NodeError):
    """A context's blocks cannot fit the disk budget, even with every unpinned context evicted."""


class InvalidAgentId(NodeError):
    pass


class PromptTooLong(NodeError):
    pass


class WorkerDead(NodeError):
    pass


class InvalidRegistration(NodeError, ValueError):
    pass


class PeerFailure(NodeError):
    """One attempt at a peer did not produce an answer; `outcome` says how."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome, self.detail = outcome, detail


class BenchError(NodeError):
    """A bench measurement could not be taken (a subprocess failed, a figure is missing)."""
