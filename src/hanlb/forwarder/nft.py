"""libnftables through ctypes.

``Nft`` runs nft command text (the same language as the ``nft`` tool, several
commands per buffer = one transaction) in the calling process's network
namespace. Output and errors are buffered instead of printed; a failed command
raises ``NftError`` with libnftables' error text.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json as _json
import threading
from typing import Any

__all__ = ["NFT_CTX_OUTPUT_JSON", "Nft", "NftError"]

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class NftError(RuntimeError):
    """A libnftables command failed; the message is libnftables' error buffer."""


def _load() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
        return lib


class _Ctx:
    """One nft_ctx with buffered output and errors."""

    def __init__(self, lib: ctypes.CDLL, flags: int) -> None:
        self._lib = lib
        ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self.ptr: int | None = ctx
        if lib.nft_ctx_buffer_output(ctx) != 0 or lib.nft_ctx_buffer_error(ctx) != 0:
            lib.nft_ctx_free(ctx)
            self.ptr = None
            raise NftError("cannot buffer libnftables output")
        if flags:
            lib.nft_ctx_output_set_flags(ctx, lib.nft_ctx_output_get_flags(ctx) | flags)

    def run(self, cmd: str) -> str:
        if self.ptr is None:
            raise NftError("nft context is closed")
        lib = self._lib
        rc = lib.nft_run_cmd_from_buffer(self.ptr, cmd.encode())
        out = lib.nft_ctx_get_output_buffer(self.ptr) or b""
        err = lib.nft_ctx_get_error_buffer(self.ptr) or b""
        if rc != 0:
            message = err.decode(errors="replace").strip() or f"nft failed (rc={rc})"
            raise NftError(message)
        return out.decode(errors="replace")

    def free(self) -> None:
        if self.ptr is not None:
            self._lib.nft_ctx_free(self.ptr)
            self.ptr = None


class Nft:
    """A libnftables handle: ``run`` returns text output, ``json`` parsed JSON.

    Not thread safe; use one per thread (the forwarder uses it from its event
    loop only).
    """

    def __init__(self) -> None:
        lib = _load()
        self._text = _Ctx(lib, 0)
        self._json = _Ctx(lib, NFT_CTX_OUTPUT_JSON)

    def run(self, cmd: str) -> str:
        """Run ``cmd`` (one or more commands, applied as one transaction)."""
        return self._text.run(cmd)

    def json(self, cmd: str) -> list[dict[str, Any]]:
        """Run ``cmd`` with JSON output; return the ``nftables`` array."""
        out = self._json.run(cmd)
        if not out.strip():
            return []
        doc = _json.loads(out)
        items = doc.get("nftables", []) if isinstance(doc, dict) else []
        return [item for item in items if isinstance(item, dict)]

    def close(self) -> None:
        self._text.free()
        self._json.free()

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
