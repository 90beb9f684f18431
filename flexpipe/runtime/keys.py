"""CURVE keys for the actors' tcp endpoints: `flexpipe keys`, key files, and socket setup.

A deployment has one *server* keypair that every tcp mailbox (ROUTER) presents, and one *client*
keypair per host or daemon that its DEALERs present; a mailbox admits only clients whose public
key is in its authorized set (a ZAP authenticator per ZeroMQ context). Key files are the ones
`zmq.auth.create_certificates` writes: `NAME.key` (public) and `NAME.key_secret` (both halves)::

    flexpipe keys --dir keys --name server     # keys/server.key, keys/server.key_secret
    flexpipe keys --dir keys --name worker1 --authorize keys/authorized

    ActorSettings(bind="tcp", curve_server_secret="keys/server.key_secret",
                  curve_client_secret="keys/worker1.key_secret",
                  curve_authorized="keys/authorized")

ipc and inproc endpoints stay plain: they are reachable only through the file system (the ipc dir
is private to the user) or the process itself.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import weakref
from typing import Any

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from flexpipe.errors import ConfigError

__all__ = ["create_keypair", "curve_enabled", "secure_router", "secure_dealer",
           "stop_authenticator", "add_keys_parser", "keys_main"]

log = logging.getLogger("flexpipe.keys")

ZAP_DOMAIN = "flexpipe"


def create_keypair(directory: str, name: str, *, force: bool = False) -> tuple[str, str]:
    """Write NAME.key and NAME.key_secret (mode 0600) into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, name)
    if not force and (os.path.exists(base + ".key") or os.path.exists(base + ".key_secret")):
        raise ConfigError(f"{base}.key or {base}.key_secret exists; pass --force to replace it")
    old = os.umask(0o077)   # the secret file is never readable by others, not even until a chmod
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


@functools.lru_cache(maxsize=64)
def _load(path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE key file {path!r}: {e}") from e
    if want_secret and secret is None:
        raise ConfigError(f"{path!r} holds no secret key (use the .key_secret file)")
    return public, secret


def _authorized(path: str) -> frozenset[bytes]:
    """Public keys (z85) in a .key file or in every .key file of a directory."""
    if not path:
        raise ConfigError("CURVE is configured but curve_authorized names no key file or directory")
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".key")]
    else:
        files = [path]
    keys = frozenset(_load(f, False)[0] for f in files)
    if not keys:
        log.warning("no authorized CURVE client keys in %s: every client will be refused", path)
    return keys


def curve_enabled(settings: Any) -> bool:
    """True when the settings name a server key (CURVE on every tcp endpoint).  Client keys or
    authorized keys without a server key are a mistake (a mistyped variable): refused, not plain tcp."""
    if getattr(settings, "curve_server_secret", "") or getattr(settings, "curve_server_public", ""):
        return True
    given = [f for f in ("curve_client_secret", "curve_authorized") if getattr(settings, f, "")]
    if given:
        raise ConfigError(f"{' and '.join(given)} set but no server key: CURVE would be off and tcp plain; give "
                          "curve_server_secret (every process with a tcp mailbox binds one, clients too), or none")
    return False


def _is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


class _KeySet:
    """ZAP credentials provider: a client is admitted when its public key is in the set."""

    def __init__(self) -> None:
        self.keys: set[bytes] = set()
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.refused += 1
        log.warning("refused a CURVE client with an unknown key %s", key.decode(errors="replace"))
        return False


# one authenticator per ZeroMQ context: it binds inproc://zeromq.zap.01 of that context
_AUTH: "weakref.WeakKeyDictionary[zmq.Context, tuple[AsyncioAuthenticator, _KeySet]]" = \
    weakref.WeakKeyDictionary()


def _authenticator(zctx: zmq.Context, settings: Any) -> _KeySet:
    entry = _AUTH.get(zctx)
    if entry is None:
        asyncio.get_running_loop()  # the authenticator serves ZAP requests on this loop
        auth = AsyncioAuthenticator(zctx)
        keyset = _KeySet()
        auth.start()
        auth.configure_curve_callback(ZAP_DOMAIN, keyset)
        entry = _AUTH[zctx] = (auth, keyset)
    entry[1].keys |= _authorized(settings.curve_authorized)
    return entry[1]


def refused_count(zctx: zmq.Context) -> int:
    """How many CURVE clients the context's authenticator has refused."""
    entry = _AUTH.get(zctx)
    return entry[1].refused if entry else 0


def stop_authenticator(zctx: zmq.Context) -> None:
    """Close the context's ZAP socket (before zctx.term(), which would wait for it)."""
    entry = _AUTH.pop(zctx, None)
    if entry is not None:
        entry[0].stop()


def secure_router(sock: zmq.Socket, zctx: zmq.Context, settings: Any, endpoint: str) -> None:
    """Make a mailbox about to bind on a tcp endpoint a CURVE server that admits authorized keys."""
    if not curve_enabled(settings) or not _is_tcp(endpoint):
        return
    if not settings.curve_server_secret:
        raise ConfigError("a tcp mailbox with CURVE needs curve_server_secret (a .key_secret file)")
    public, secret = _load(settings.curve_server_secret, True)
    _authenticator(zctx, settings)  # before bind: with no ZAP handler libzmq admits any client
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def secure_dealer(sock: zmq.Socket, settings: Any, endpoint: str) -> None:
    """Make a DEALER about to connect to a tcp endpoint a CURVE client of the server key."""
    if not curve_enabled(settings) or not _is_tcp(endpoint):
        return
    server_public = (_load(settings.curve_server_public, False)[0] if settings.curve_server_public
                     else _load(settings.curve_server_secret, False)[0])
    client = settings.curve_client_secret or settings.curve_server_secret
    public, secret = _load(client, True)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


# --- flexpipe keys ---------------------------------------------------------------------------------

def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    """Add `flexpipe keys` to the command's subparsers."""
    p = sub.add_parser("keys", help="generate a CURVE keypair for tcp actor endpoints",
                       description="Write NAME.key (public) and NAME.key_secret (secret, mode 0600) into "
                                   "DIR, for ActorSettings.curve_server_secret / curve_client_secret; "
                                   "--authorize also copies the public key into an authorized-keys dir.")
    p.add_argument("--dir", default="flexpipe-keys", help="output directory (default: %(default)s)")
    p.add_argument("--name", default="server", help="key file base name (default: %(default)s)")
    p.add_argument("--authorize", default=None, metavar="DIR",
                   help="copy the public key into this authorized-clients directory")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=keys_main)


def keys_main(args: argparse.Namespace) -> int:
    """Generate the keypair described by `args`; prints the file paths."""
    public, secret = create_keypair(args.dir, args.name, force=args.force)
    print(f"public key: {public}")
    print(f"secret key: {secret}")
    if args.authorize:
        os.makedirs(args.authorize, exist_ok=True)
        dest = shutil.copy(public, os.path.join(args.authorize, os.path.basename(public)))
        print(f"authorized: {dest}")
    return 0
