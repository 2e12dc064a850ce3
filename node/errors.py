"""Errors raised by the node.

NodeError
├── ModelSpecError        a model spec that names nothing loadable
├── ModelImportError      a GGUF file that cannot be converted
├── CheckpointError       a checkpoint that cannot be trusted
│   ├── CheckpointCorrupt        digest, size or structure mismatch
│   ├── CheckpointModelMismatch  written by another model or tokenizer
│   └── CheckpointVersionError   an unknown format version
├── InvalidAgentId        an agent id that is not safe to use
├── PromptTooLong         a prompt beyond the model's or the node's limit
└── WorkerDead            the thread that owns the model has died
"""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


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


class InvalidAgentId(NodeError):
    pass


class PromptTooLong(NodeError):
    pass


class WorkerDead(NodeError):
    pass
