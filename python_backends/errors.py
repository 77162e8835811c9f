"""Errors the plain modules raise; the model.py adapters turn them into Triton errors with the matching code."""


class InvalidArgument(ValueError):
    """The request is malformed; the message names the input and what is allowed (Triton INVALID_ARG)."""


class Unavailable(RuntimeError):
    """The server cannot take the request now (queue full, shutting down): Triton UNAVAILABLE."""
