"""Serve a Flower ``NumPyClient`` to an ``insitu server``: what ``start_numpy_client`` does in Flower.

A Flower client has no insitu identity, so the shim takes one from the environment (or keyword
arguments, which win):

- ``INSITU_CERTS``: this client's folder from ``insitu keygen`` (``client.key``, ``ca.pem`` and, for
  mutual TLS, ``tls.pem``/``tls.key``). The connection is then TLS and the client signs the server's
  challenge with ``client.key``, exactly as ``insitu client --certs``.
- ``INSITU_CLIENT_ID``: the client id (as in the server's allow-list; required with ``INSITU_CERTS``).
  Without certificates it defaults to ``flower-<host>-<pid>``.
- ``INSITU_SERVER_ADDRESS``: host:port to connect to instead of the script's ``server_address``
  (tutorial scripts hard-code ``localhost:8080``).

Without ``INSITU_CERTS`` the connection is plaintext and unauthenticated, which only a server started
with ``--insecure`` accepts; to a non-loopback address the shim refuses unless ``insecure=True`` is
passed explicitly. Flower's ``root_certificates`` cannot stand in for the folder: insitu also needs the
client's signing key.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insitu.flower.adapter import NumPyClientAdapter, unwrap

if TYPE_CHECKING:
    from insitu.net.client import ClientSettings

log = logging.getLogger("insitu.flower")

CERTS_ENV = "INSITU_CERTS"
CLIENT_ID_ENV = "INSITU_CLIENT_ID"
ADDRESS_ENV = "INSITU_SERVER_ADDRESS"


def start_numpy_client(
    *,
    server_address: str,
    client: object,
    grpc_max_message_length: int | None = None,
    root_certificates: bytes | str | None = None,
    insecure: bool | None = None,
    transport: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    client_id: str | None = None,
    certs: str | Path | None = None,
) -> None:
    """Serve the Flower ``client`` (a ``NumPyClient`` or its ``to_client()``) to the insitu server at
    ``server_address`` until the server ends the federation.

    Flower's keyword arguments are accepted: ``grpc_max_message_length`` and ``transport`` are ignored
    (insitu's transport has its own limits and is always gRPC), ``max_wait_time`` becomes how long an
    unreachable server is retried (default 600 s), ``max_retries`` is not supported beyond that.
    ``client_id`` and ``certs`` override ``INSITU_CLIENT_ID`` and ``INSITU_CERTS``; ``INSITU_SERVER_ADDRESS``
    overrides ``server_address`` (see the module).
    Raises ``ConnectionRefused`` when the server refuses the client, ``TimeoutError`` when it stays
    unreachable, ``ValueError`` for settings that cannot work.
    """
    from insitu.net import security
    from insitu.net.client import ClientTLS, connect

    numpy_client = unwrap(client)
    server_address = os.environ.get(ADDRESS_ENV) or server_address
    if transport not in (None, "grpc-bidi", "grpc-rere", "grpc-adapter"):
        raise ValueError(f"transport {transport!r}: insitu clients always use insitu's gRPC transport; drop it")
    if max_retries is not None:
        log.warning("max_retries is ignored: an unreachable insitu server is retried for max_wait_time seconds")
    if grpc_max_message_length is not None:
        log.info("grpc_max_message_length is ignored: insitu splits messages into chunks")
    folder = certs if certs is not None else os.environ.get(CERTS_ENV) or None
    given_id = client_id if client_id is not None else os.environ.get(CLIENT_ID_ENV) or None
    tls, key = None, None
    if folder is not None:
        if insecure:
            raise ValueError(f"insecure=True and {CERTS_ENV}/certs={folder}: give one (the folder means TLS)")
        files = security.ClientFiles.in_dir(folder)
        if not files.signing_key.exists():
            raise FileNotFoundError(f"{files.signing_key} not found: {CERTS_ENV} must be this client's folder from "
                                    "`insitu keygen` (client.key, ca.pem, tls.pem, tls.key)")
        if given_id is None:
            raise ValueError(f"set {CLIENT_ID_ENV} (or pass client_id=) to this client's id in the server's "
                             f"allow-list: with {CERTS_ENV} the server checks the id against the key")
        if root_certificates is not None:
            log.info("root_certificates ignored: the CA is %s from %s", files.ca_cert, CERTS_ENV)
        tls, key = ClientTLS(files.ca_cert, files.tls_cert, files.tls_key), files.signing_key
    else:
        if root_certificates is not None:
            raise ValueError(f"root_certificates alone cannot connect to an insitu server, which also checks each "
                             f"client's signing key: set {CERTS_ENV} to this client's folder from `insitu keygen` "
                             f"(and {CLIENT_ID_ENV} to its id); see docs/flower-migration.md")
        if insecure is False:
            raise ValueError(f"insecure=False asks for TLS, which needs this client's folder from `insitu keygen`: set "
                             f"{CERTS_ENV} (and {CLIENT_ID_ENV}), or drop insecure=False on loopback")
        if not insecure and not security.is_loopback(server_address):
            raise ValueError(f"{server_address} is not a loopback address and no {CERTS_ENV} folder is set: a "
                             f"plaintext, unauthenticated connection is allowed only on loopback unless you pass "
                             f"insecure=True (the server must run --insecure); better, set {CERTS_ENV}")
    name = given_id or f"flower-{socket.gethostname()}-{os.getpid()}"

    def build(server_model: str) -> NumPyClientAdapter:
        """The adapter, checked against the server's arrays before the first task; the server's task seed
        never seeds this process's global generators (the client's own noise must stay unknown to it)."""
        return NumPyClientAdapter(numpy_client, precheck=True, server_model=server_model, seed_globals=False)

    log.info("serving Flower client %s to %s as %s", type(numpy_client).__name__, server_address, name)
    connect(build, server_address, client_id=name, signing_key=key, tls=tls,
            give_up_after_s=600.0 if max_wait_time is None else float(max_wait_time))


def start_client(*, server_address: str, client: object, **kwargs: Any) -> None:
    """Flower's ``start_client``: the same as :func:`start_numpy_client` for a ``to_client()`` result or a
    ``NumPyClient`` (Flower clients written against ``FitIns``/``FitRes`` are refused)."""
    start_numpy_client(server_address=server_address, client=client, **kwargs)


def load_factory(spec: str) -> Any:
    """The object named by ``module:attribute`` (or ``path/to/file.py:attribute``); the current directory (or
    the file's folder) is searched first while the module is imported, as ``python client.py`` would.

    A file is registered under a private module name (``_insitu_flower_client_<stem>``), so a ``json.py`` or
    ``insitu.py`` never replaces a loaded module; afterwards the folder added to ``sys.path`` moves to its
    end, so later imports find installed modules first (and the file's own lazy sibling imports still work).
    """
    import importlib
    import importlib.util
    import sys

    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--flower-client {spec!r}: give MODULE:FACTORY, e.g. client:make_client or "
                         "path/to/client.py:FlowerClient")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"--flower-client: {path} not found")
        private = f"_insitu_flower_client_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(private, path)
        if spec_ is None or spec_.loader is None:
            raise ValueError(f"--flower-client: cannot import {path}")
        module = importlib.util.module_from_spec(spec_)
        sys.modules[private] = module
        with _searched_first(str(path.resolve().parent)):
            spec_.loader.exec_module(module)
    else:
        folder = None if "" in sys.path or os.getcwd() in sys.path else os.getcwd()
        try:
            with _searched_first(folder):
                module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ValueError(f"--flower-client {spec!r}: cannot import {module_name!r} ({error}); run from the folder "
                             "that holds it, or give path/to/file.py:FACTORY") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"--flower-client {spec!r}: {module_name} has no {attribute!r}") from None


@contextlib.contextmanager
def _searched_first(folder: str | None) -> Iterator[None]:
    """``folder`` at the front of ``sys.path`` while the block runs, then at its end (never shadowing installed
    or standard modules later); nothing when ``folder`` is None or already on the path."""
    import sys

    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.append(folder)


def make_client(factory: Any, client_id: str) -> object:
    """Call a ``--flower-client`` factory: ``factory(client_id)`` if it has a required positional parameter,
    else ``factory()``.

    The id is passed as an int when it is a number (Flower examples index their data partitions with it,
    as seed tutorials' ``FederatedClient(client_id)`` does), else as the string.
    """
    if not callable(factory):
        raise ValueError(f"--flower-client: {factory!r} is not callable (give a class or a function)")  # noqa: TRY004 (a user setting)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    takes_argument = signature is not None and any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in signature.parameters.values())
    if takes_argument:
        return factory(int(client_id) if client_id.isdigit() else client_id)
    return factory()


NOT_FOR_FLOWER = ("dataset", "data_dir", "partition_id", "num_partitions", "partition", "alpha", "partition_seed",
                  "train_limit", "csv", "label_column", "num_classes", "model", "state_dir")
"""``insitu client`` settings that describe insitu's own client (its data, partition and model), which a
Flower client brings itself: refused with ``--flower-client``."""


def serve_flower_cli(spec: str, settings: ClientSettings, given: Iterable[str],
                     on_task: Callable[[bool], None] | None = None) -> int:
    """``insitu client --flower-client SPEC``: build the Flower client from ``SPEC`` and serve it with the
    command's network and security settings. ``given`` are the settings the user set (flags and file);
    data and model settings among them are refused. Returns the number of tasks done."""
    from insitu.net.client import connect

    wrong = sorted(name for name in given if name in NOT_FOR_FLOWER)
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        raise ValueError(f"{flags} cannot apply with --flower-client: a Flower client loads its own data and builds "
                         "its own model (start the server with the --model that fits it); remove them")
    client_id = str(settings.client_id)
    numpy_client = unwrap(make_client(load_factory(spec), client_id))
    tls, key = settings.credentials()

    def build(server_model: str) -> NumPyClientAdapter:
        return NumPyClientAdapter(numpy_client, precheck=True, server_model=server_model, seed_globals=False)

    return connect(build, settings.address, client_id=client_id, signing_key=key, tls=tls,
                   give_up_after_s=settings.give_up_after_s, poll_wait_s=settings.poll_wait_s, on_task=on_task,
                   min_noise_multiplier=settings.dp_min_noise if settings.dp_min_noise > 0 else None)
