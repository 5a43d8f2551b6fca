"""What syncer relies on in globus-sdk beyond calling it: checked here so that a new SDK
release that changes it fails these tests by name, instead of syncer quietly doing
something else (an override the SDK no longer calls is dead code: a login would log its
code again, renewals would race).

syncer uses no private part of globus-sdk (README, "Private parts of globus-sdk it
uses"). What it does rely on: the public methods its subclasses override are still the
ones the SDK calls, and the token store file keeps the layout of the SDK's
``SQLiteTokenStorage``, in which earlier releases wrote it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import time
import typing as t
from pathlib import Path

import globus_sdk
import pytest
from globus_sdk.login_flows import CommandLineLoginFlowManager, LocalServerLoginFlowManager
from globus_sdk.token_storage import SQLiteTokenStorage, TokenStorageData

import syncer
from syncer.globus.token_store import TokenStore

SYNCER = Path(syncer.__file__).parent
WHAT_TO_DO = (
    "use a public API instead; where none can do the job, name the part and why in README.md's"
    " section 'Private parts of globus-sdk it uses' and allow it in tests/test_sdk_contract.py"
)
#: private globus-sdk parts syncer may use, each named in the README with why (none now)
ALLOWED_PRIVATE: frozenset[str] = frozenset()


def sdk_users() -> list[t.Any]:
    """syncer's modules that use globus-sdk."""
    return [
        importlib.import_module(".".join(("syncer", *path.relative_to(SYNCER).with_suffix("").parts)))
        for path in sorted(SYNCER.rglob("*.py"))
        if "globus_sdk" in path.read_text() and path.name != "__main__.py"
    ]


#: NamedTuple's public methods (named with an underscore so as not to clash with fields)
NAMEDTUPLE = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in NAMEDTUPLE


def names_syncer_defines() -> set[str]:
    """Every function, class, attribute and argument name syncer's own code defines."""
    names: set[str] = set()
    for path in SYNCER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def test_no_private_globus_sdk_part_is_imported_or_reached_into() -> None:
    """No import of a private globus-sdk module or name (``_internal``, the login flow's
    ``local_server`` module, which the SDK keeps internal), and no ``._name`` that
    syncer does not define itself (such as ``SQLiteTokenStorage._connection``)."""
    own = names_syncer_defines()
    found: list[str] = []
    for path in sorted(SYNCER.rglob("*.py")):
        tree = ast.parse(path.read_text())
        uses_sdk = False
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("globus_sdk"):
                uses_sdk = True
                parts = (node.module or "").split(".")
                if any(is_private(part) or part == "local_server" for part in parts):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
                found += [f"{path.name}:{node.lineno}: import {alias.name}" for alias in node.names if is_private(alias.name)]
            elif isinstance(node, ast.Import) and any(alias.name.startswith("globus_sdk") for alias in node.names):
                uses_sdk = True
                found += [
                    f"{path.name}:{node.lineno}: import {alias.name}"
                    for alias in node.names if any(is_private(part) for part in alias.name.split("."))
                ]
        if not uses_sdk:
            continue
        found += [
            f"{path.name}:{node.lineno}: ._{node.attr[1:]}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own
        ]
    found = [line for line in found if line.rsplit(" ", 1)[-1].lstrip(".") not in ALLOWED_PRIVATE]
    assert not found, f"private globus-sdk parts used: {found}; {WHAT_TO_DO}"


def sdk_subclasses() -> list[type]:
    """syncer's classes that extend a globus-sdk class."""
    classes = {
        cls
        for module in sdk_users()
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__.startswith("syncer.")
        and any(base.__module__.startswith("globus_sdk") for base in cls.__mro__[1:])
    }
    return sorted(classes, key=lambda cls: cls.__qualname__)


def test_syncer_extends_the_sdk_where_it_says() -> None:
    """The inventory below is complete: a new subclass of an SDK class is checked too."""
    names = {cls.__name__ for cls in sdk_subclasses()}
    assert {
        "TokenStore", "SharedRefreshTokenAuthorizer", "SharedClientCredentialsAuthorizer",
        "_BrowserLoginFlow", "_PasteLoginFlow",
    } <= names, names


@pytest.mark.parametrize("cls", sdk_subclasses(), ids=lambda cls: cls.__name__)
def test_every_sdk_method_syncer_overrides_is_public_and_still_called_so(cls: type) -> None:
    """Each method a syncer class defines that an SDK base also has overrides a public
    method of the same parameters; a private one of the SDK's is never overridden.

    An override of a method the SDK renamed or dropped would never be called."""
    sdk_bases = [base for base in cls.__mro__ if base.__module__.startswith("globus_sdk")]
    own = [(name, member) for c in cls.__mro__ if c.__module__.startswith("syncer.") for name, member in vars(c).items()]
    for name, member in own:  # the class's and its syncer mixins' (syncer.globus.auth._SharedRenewal)
        if not callable(member) and not isinstance(member, classmethod | staticmethod):
            continue
        base = next((b for b in sdk_bases if name in vars(b)), None)
        if name.startswith("__") or base is None:
            continue  # syncer's own method (or a dunder)
        assert not is_private(name), f"{cls.__name__}.{name} overrides globus-sdk's private {base.__name__}.{name}; {WHAT_TO_DO}"
        ours = list(inspect.signature(member).parameters)
        theirs = list(inspect.signature(getattr(base, name)).parameters)
        assert ours == theirs, (
            f"{cls.__name__}.{name}{ours} no longer matches globus-sdk's {base.__name__}.{name}{theirs}:"
            " the SDK changed the method syncer overrides; adapt the override"
        )


@pytest.mark.parametrize(
    ("sdk_class", "method", "caller"),
    [
        # the route of every renewal (syncer.globus.auth._SharedRenewal): the token is checked,
        # and renewed, in ensure_valid_token; the SDK's transport calls the other two
        # (a request, a 401), which the e2e tests of renewals prove
        (globus_sdk.RefreshTokenAuthorizer, "ensure_valid_token", "get_authorization_header"),
        (globus_sdk.ClientCredentialsAuthorizer, "ensure_valid_token", "get_authorization_header"),
        (globus_sdk.RefreshTokenAuthorizer, "handle_missing_authorization", None),
        # the browser flow's redirect server, and the paste flow's two steps (syncer.globus.login)
        (LocalServerLoginFlowManager, "background_local_server", "run_login_flow"),
        (CommandLineLoginFlowManager, "print_authorize_url", "run_login_flow"),
        (CommandLineLoginFlowManager, "prompt_for_code", "run_login_flow"),
    ],
)
def test_the_sdk_still_calls_the_public_methods_syncer_overrides(sdk_class: type, method: str, caller: str | None) -> None:
    """The SDK's own code still goes through each method syncer overrides (read from its
    source: an override of a method the SDK stopped calling would be dead code)."""
    assert callable(getattr(sdk_class, method, None)), f"globus-sdk's {sdk_class.__name__} has no {method} any more"
    if caller is not None:
        source = inspect.getsource(getattr(sdk_class, caller))
        assert f"self.{method}(" in source, (
            f"globus-sdk's {sdk_class.__name__}.{caller} no longer calls {method}: syncer's override"
            " would never run; adapt syncer.auth / syncer.login"
        )
    if method == "background_local_server":  # what the flow does with the server syncer yields
        source = inspect.getsource(sdk_class.run_login_flow)
        assert "server.socket.getsockname()" in source and "server.wait_for_code()" in source, (
            "globus-sdk's LocalServerLoginFlowManager.run_login_flow uses its redirect server differently:"
            " adapt syncer.globus.login._RedirectServer"
        )


def records(tokens: dict[str, TokenStorageData]) -> dict[str, dict[str, t.Any]]:
    """Token data as plain dicts (TokenStorageData has no equality of its own)."""
    return {server: data.to_dict() for server, data in tokens.items()}


def token_data(resource_server: str, refresh: str | None) -> TokenStorageData:
    return TokenStorageData(
        resource_server=resource_server, identity_id="9d7d8bd2-0fb5-4a0e-8d1b-1a2b3c4d5e6f", scope="openid",
        access_token=f"access-{resource_server}", refresh_token=refresh,
        expires_at_seconds=int(time.time()) + 3600, token_type="Bearer",
    )


def test_a_store_the_sdk_wrote_is_read_and_written_as_before(tmp_path: Path) -> None:
    """Earlier releases wrote the token store with the SDK's SQLiteTokenStorage: its
    records read the same through TokenStore, in every namespace, and what TokenStore
    writes reads the same through the SDK's class."""
    path = tmp_path / "tokens.db"
    sdk = SQLiteTokenStorage(path)
    sdk_other = SQLiteTokenStorage(path, namespace="client_credentials:x")
    try:
        sdk.store_token_data_by_resource_server({"groups.api.globus.org": token_data("groups.api.globus.org", "r1")})
        sdk_other.store_token_data_by_resource_server({"auth.globus.org": token_data("auth.globus.org", None)})
        with TokenStore(path) as store, TokenStore(path, namespace="client_credentials:x") as other:
            assert records(store.all_tokens()) == records(sdk.get_token_data_by_resource_server())
            assert records(other.all_tokens()) == records(sdk_other.get_token_data_by_resource_server())
            store.store_token_data_by_resource_server({"transfer.api.globus.org": token_data("transfer.api.globus.org", "r2")})
            assert store.remove_token_data("groups.api.globus.org")
            expected = records(store.all_tokens())
        assert records(sdk.get_token_data_by_resource_server()) == expected
        assert list(expected) == ["transfer.api.globus.org"]
    finally:
        sdk.close()
        sdk_other.close()


def test_a_new_store_is_one_the_sdk_reads(tmp_path: Path) -> None:
    """A store TokenStore creates (user-only from the start) holds what the SDK's class reads."""
    path = tmp_path / "new" / "tokens.db"
    with TokenStore(path) as store:
        store.store_token_data_by_resource_server({"groups.api.globus.org": token_data("groups.api.globus.org", "r")})
        expected = records(store.all_tokens())
    assert path.stat().st_mode & 0o077 == 0
    sdk = SQLiteTokenStorage(path)
    try:
        assert records(sdk.get_token_data_by_resource_server()) == expected
    finally:
        sdk.close()
