"""Typed errors of FlexPipe.  Each carries what the user needs to act on it."""

from __future__ import annotations


class FlexPipeError(Exception):
    """Base class of every error FlexPipe raises on purpose."""


# --- model, checkpoints, configuration -------------------------------------------------------
class ConfigError(FlexPipeError, ValueError):
    """A model or runtime configuration is invalid or unsupported."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one FlexPipe implements."""


class CheckpointError(FlexPipeError):
    """A checkpoint is missing, corrupt, or does not match its config (names file and tensor)."""


class UnknownModelError(ConfigError):
    """A model name is neither a preset nor a checkpoint directory."""


# --- partitioning and placement ----------------------------------------------------------------
class PartitionError(FlexPipeError, ValueError):
    """No valid partition exists for the request (says which unit and how much memory is missing)."""


class PlacementError(FlexPipeError):
    """No placement of the requested stages fits the cluster."""


class TopologyError(FlexPipeError, ValueError):
    """A cluster description is invalid, or names a GPU or node that does not exist."""


class NoDriverError(TopologyError):
    """No NVIDIA driver (or no pynvml) on this machine: GPUs cannot be discovered, describe them in a file."""


# --- requests ------------------------------------------------------------------------------------
class RequestError(FlexPipeError, ValueError):
    """A request is invalid (empty prompt, too long, bad sampling parameters)."""


class CapacityError(RequestError):
    """A request can never fit in the KV memory of the pipeline."""


class QueueFullError(RequestError):
    """Too many requests are waiting: back-pressure, retry later."""


class RequestCancelled(FlexPipeError):
    """The request was cancelled before it finished."""


# --- actors and wire -------------------------------------------------------------------------------
class ActorError(FlexPipeError):
    """Base class of actor-runtime errors."""


class AskTimeout(ActorError, TimeoutError):
    """An ask() got no reply within its timeout."""


class PeerDeadError(ActorError):
    """The peer actor is dead or stopped answering heartbeats."""


class RemoteError(ActorError):
    """The peer's handler raised; carries the remote error type and message."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class ProtocolError(ActorError):
    """A frame could not be decoded (not msgpack, unknown kind, bad version, bad tensor header)."""


class MessageTooLarge(ProtocolError):
    """A message is larger than `ActorSettings.max_message_bytes`: it was not sent (a reply: the asker
    gets this instead of it)."""

    # what its messages tell a user to change (the setting's flag and variable, not only the class field)
    HINT = "raise the max_message_bytes setting (--max-message-bytes, FLEXPIPE_MAX_MESSAGE_BYTES)"


class SenderRefused(ActorError):
    """A message came from a peer its receiver does not know in that role (e.g. a StepInput not from
    the stage's upstream, a reshape command not from its controller); dropped before any handler ran."""


class StepRejected(ActorError):
    """A StepInput is inconsistent with the stage's KV (an unknown sequence not starting at 0,
    malformed fields): the stage refuses it and allocates nothing."""


class ActorClosed(ActorError):
    """The actor or its mailbox is closed."""


class PipelineDown(ActorError):
    """The pipeline can serve no more (a stage died and could not be replaced): restart it."""


# --- reshaping ----------------------------------------------------------------------------------
class ReshapeError(FlexPipeError):
    """A reshape failed and was aborted; the old epoch keeps serving."""
