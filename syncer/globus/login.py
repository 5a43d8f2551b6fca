"""``syncer login``: the Native App flow, and the proof that the new credentials work.

The flow runs on the SDK's login flow managers (PKCE, ``access_type=offline`` so
Globus issues a refresh token), through their public methods only: where a browser
can be opened (Python's ``webbrowser``, which honours ``$BROWSER``) the
``LocalServerLoginFlowManager`` receives the code on a redirect to 127.0.0.1, served
by a small server of syncer's own (``background_local_server``); otherwise, or with
``--no-browser``, the ``CommandLineLoginFlowManager``'s paste flow. The tokens are
stored, then proved by reading one group with its memberships, as a sync does.
"""

from __future__ import annotations

import contextlib
import html
import http.server
import queue
import re
import string
import sys
import threading
import typing as t
import urllib.parse

import globus_sdk
from globus_sdk.gare import GlobusAuthorizationParameters
from globus_sdk.login_flows import (
    CommandLineLoginFlowManager,
    LocalServerEnvironmentalLoginError,
    LocalServerLoginError,
    LocalServerLoginFlowManager,
)

from syncer.config import GROUPS_SCOPE, Config, is_groups_scope
from syncer.errors import ConfigError, StorageError, SyncerError
from syncer.globus.auth import (
    auth_client,
    authorizer_from_store,
    client_options,
    describe_api_error,
    describe_network_error,
    groups_authorizer,
)
from syncer.globus.client_secret import ClientSecret
from syncer.globus.token_store import GROUPS_RESOURCE_SERVER, TokenStore
from syncer.logs import module_logger
from syncer.storage.ownership import CLIENT, Credentials, DatabaseOwner, database_owner, from_id_token, is_owner, mismatch

log = module_logger(__name__)

Say = t.Callable[[str], None]
#: obtains the authorization code, given the authorize URL (stdin; the demo visits the URL itself)
ReadCode = t.Callable[[str], str]


class AccessCheck(t.NamedTuple):
    """What one read with the new credentials showed."""

    identity: str | None  # username, from the identity's own membership
    groups: int
    group_name: str | None  # the group read with its memberships
    members: int


#: scopes with which Globus Groups lets the identity read memberships
_MEMBERSHIP_SCOPES = ("all", "view_my_groups_and_memberships")


def _reads_memberships(granted: str) -> bool:
    """Whether the granted scopes include one with which Groups serves memberships."""
    names = {re.split(r"[:/]", scope)[-1] for scope in granted.split() if is_groups_scope(scope)}
    return bool(names.intersection(_MEMBERSHIP_SCOPES))


def _scope_advice(config: Config, granted: str) -> str:
    where = f"`scopes` in {config.source}" if config.source else "`scopes` in the configuration (or SYNCER_SCOPES)"
    return (
        f"the granted scopes ({granted or 'none for Globus Groups'}) cannot read group memberships;"
        f' add "{GROUPS_SCOPE}" to {where}'
    )


def check_access(config: Config, authorizer: globus_sdk.authorizers.GlobusAuthorizer) -> AccessCheck:
    """Read the identity's groups and one group with its memberships, as a sync does.

    Prefers a group the identity manages, whose whole member list it may see.
    """
    client = globus_sdk.GroupsClient(authorizer=authorizer, **client_options(config))
    groups = list(client.get_my_groups(statuses=list(config.my_statuses)))
    who = _identity_label(groups)
    if not groups:
        return AccessCheck(who, 0, None, 0)
    managed = [g for g in groups if any(m.get("role") in ("admin", "manager") for m in g.get("my_memberships") or [])]
    group = (managed or groups)[0]
    doc = client.get_group(group["id"], include=["memberships"])
    return AccessCheck(who, len(groups), str(doc.get("name") or group["id"]), len(doc.get("memberships") or []))


def _identity_label(groups: list[dict[str, t.Any]]) -> str | None:
    for group in groups:
        for membership in group.get("my_memberships") or []:
            if membership.get("username"):
                return str(membership["username"])
    return None


def _describe_check(check: AccessCheck) -> str:
    who = f" as {check.identity}" if check.identity else ""
    if not check.groups:
        return f"{who}: no groups yet"
    return f"{who}: {check.groups} group(s); read {check.group_name!r} with {check.members} membership(s)"


class _PasteLoginFlow(CommandLineLoginFlowManager):
    """The SDK's command-line flow, with the URL on a line of its own on stdout and
    the code read by the caller (which turns a closed stdin into one clear line)."""

    def __init__(self, client: globus_sdk.NativeAppAuthClient, say: Say, read_code: ReadCode) -> None:
        super().__init__(client, request_refresh_tokens=True)
        self._say = say
        self._read_code = read_code
        self._url = ""

    def print_authorize_url(self, authorize_url: str) -> None:
        self._url = authorize_url
        self._say("Open this URL, log in, and paste the authorization code below:")
        self._say(authorize_url)

    def prompt_for_code(self) -> str:
        code = self._read_code(self._url).strip()
        if not code:
            raise SyncerError("no authorization code given; nothing changed")
        return code


#: how long the browser flow waits for the redirect (as the SDK's own server does)
LOGIN_WAIT_SECONDS = 3600


class _RedirectServer(http.server.HTTPServer):
    """Receives the browser's redirect on 127.0.0.1: the authorization code, or why
    there is none. The SDK's flow uses what ``background_local_server`` yields through
    ``socket`` (its address, for the redirect URI) and ``wait_for_code()``.

    syncer's own rather than the SDK's server, which lives in a module the SDK keeps
    internal and logs each request line, the code in it, to stderr.
    """

    def __init__(self, address: tuple[str, int], page: string.Template) -> None:
        super().__init__(address, _RedirectHandler)
        self.page = page
        self.results: queue.Queue[str | BaseException] = queue.Queue()

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        """A request that failed ends the wait with its error (not a traceback on stderr)."""
        error = sys.exc_info()[1]
        self.results.put(error if error is not None else LocalServerLoginError("the redirect could not be read"))

    def wait_for_code(self) -> str | BaseException:
        try:
            return self.results.get(timeout=LOGIN_WAIT_SECONDS)
        except queue.Empty:
            raise LocalServerLoginError("Login timed out. Please try again.") from None


class _RedirectHandler(http.server.BaseHTTPRequestHandler):
    """Answers the redirect with the flow's page and hands its code (or error) to the server."""

    server: _RedirectServer

    def do_GET(self) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        code = query.get("code")
        why = query.get("error_description", query.get("error"))
        # the page's fields, as documented for LocalServerLoginFlowManager's html_template
        page = self.server.page.substitute(
            login_result="Login successful" if code else "Login failed",
            post_login_message="" if code else html.escape(why or ""),
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode("utf-8"))
        self.server.results.put(code or LocalServerLoginError(why))

    def log_message(self, format: str, *args: t.Any) -> None:  # noqa: A002 - the base class's name
        """Nothing on stderr: the request line holds the authorization code."""


class _BrowserLoginFlow(LocalServerLoginFlowManager):
    """The SDK's local-redirect flow on 127.0.0.1, on syncer's redirect server, saying
    what it waits for just before the browser opens."""

    def __init__(self, client: globus_sdk.NativeAppAuthClient, say: Say) -> None:
        super().__init__(client, request_refresh_tokens=True, server_address=("127.0.0.1", 0))
        self._say = say

    @contextlib.contextmanager
    def background_local_server(self) -> t.Iterator[_RedirectServer]:  # type: ignore[override]
        server = _RedirectServer(self.server_address, self.html_template)
        thread = threading.Thread(target=server.serve_forever, name="syncer-login-redirect", daemon=True)
        thread.start()
        try:
            # the SDK opens the browser next, inside this block
            self._say(
                "Opening a browser to log in to Globus; waiting for the login to finish there"
                " (Ctrl-C to stop; `syncer login --no-browser` to paste a code instead)."
            )
            yield server
        finally:
            server.shutdown()
            server.server_close()


def _run_login_flow(config: Config, no_browser: bool, read_code: ReadCode, say: Say) -> globus_sdk.OAuthTokenResponse:
    """The browser flow where a browser can be opened, else the paste flow."""
    client = auth_client(config)
    # openid: Globus Auth then says whose tokens these are (the id_token), which the
    # database's owner is checked against (syncer.storage.ownership)
    scopes = [*config.scopes, *([] if "openid" in config.scopes else ["openid"])]
    params = GlobusAuthorizationParameters(required_scopes=scopes)
    try:
        if not no_browser:
            try:
                return _BrowserLoginFlow(client, say).run_login_flow(params)
            except LocalServerEnvironmentalLoginError as err:
                say(f"No browser can be opened here ({err}); log in by pasting a code instead.")
        return _PasteLoginFlow(client, say, read_code).run_login_flow(params)
    except globus_sdk.AuthAPIError as err:
        raise SyncerError(f"Globus Auth refused the code: {describe_api_error(err)}") from None
    except globus_sdk.NetworkError as err:
        raise SyncerError(f"Globus Auth could not be reached: {describe_network_error(err)}") from None
    except LocalServerLoginError as err:
        raise SyncerError(f"login failed: {err}") from None


def login(
    config: Config,
    store: TokenStore,
    *,
    no_browser: bool,
    read_code: ReadCode,
    say: Say,
) -> None:
    """Run the Native App flow, store the tokens and prove they work.

    ``read_code(url)`` returns the authorization code the user pastes (the paste flow
    only); ``say`` prints to the user. The proof reads one group with its memberships
    as a sync would; tokens whose scopes cannot do that are not kept (ConfigError
    naming the scope to add and where).
    """
    response = _run_login_flow(config, no_browser, read_code, say)
    issued = response.by_resource_server.get(GROUPS_RESOURCE_SERVER)
    if issued is None:
        raise ConfigError(f"Globus Auth issued no token for Globus Groups: {_scope_advice(config, '')}")
    if not issued.get("refresh_token"):
        raise SyncerError("Globus Auth issued no refresh token; unattended syncs need one")
    who = from_id_token(response)
    owner = _database_owner(config)
    if owner is not None and who is not None:
        if not is_owner(owner, who):
            _revoke_unused(config, response)
            raise ConfigError(f"{mismatch(owner, who, config.database)}; the new tokens were not stored")
        who = who._replace(id=owner.id)  # a linked identity of the owner's stands for it
    store.save(response, identity_id=who.id if who else None)
    try:
        check = check_access(config, authorizer_from_store(config, store))
    except globus_sdk.GlobusAPIError as err:
        if err.http_status in (401, 403) and not _reads_memberships(issued.get("scope", "")):
            store.clear()  # they cannot serve a sync: do not leave a login that looks done
            raise ConfigError(
                f"Globus Groups refused the new tokens ({describe_api_error(err)}):"
                f" {_scope_advice(config, issued.get('scope', ''))}; the tokens were not kept"
            ) from None
        raise SyncerError(f"logged in, but Globus Groups refused the new token: {describe_api_error(err)}") from None
    except globus_sdk.NetworkError as err:
        raise SyncerError(f"logged in, but Globus Groups could not be reached: {describe_network_error(err)}") from None
    say(f"Logged in{_describe_check(check)}. Tokens stored in {store.path}")


def _database_owner(config: Config) -> DatabaseOwner | None:
    """The configured database's owner, if it exists and has one (read-only; a
    database that cannot be read is no reason to refuse a login, only to warn)."""
    from syncer.storage.database import open_for_reading

    if not config.database.exists():
        return None
    try:
        with open_for_reading(config.database, config.busy_timeout, syncer_tables=False) as db:
            return database_owner(db)
    except StorageError as err:
        log.warning("could not check whose data %s holds: %s", config.database, err)
        return None


def _revoke_unused(config: Config, response: globus_sdk.OAuthTokenResponse) -> None:
    """Revoke the tokens of a login that is not kept (best effort: they were never stored)."""
    client = auth_client(config)
    for issued in response.by_resource_server.values():
        token = issued.get("refresh_token") or issued.get("access_token")
        try:
            client.oauth2_revoke_token(token)
        except globus_sdk.GlobusError as err:
            log.warning("could not revoke the unused tokens at Globus Auth: %s", type(err).__name__)
            return


def confirm_client_credentials(config: Config, secret: ClientSecret, say: Say) -> None:
    """``syncer login`` with a confidential client: none is needed; prove the
    credentials work instead (a rejected secret is a ConfigError naming its source).

    The secret is checked with Globus Auth every time (a new token, never the cached
    one): "the credentials work" must be true of the secret in place now. A database
    that belongs to another identity is a ConfigError before anything else."""
    owner = _database_owner(config)
    who = Credentials(CLIENT, config.client_id, None)
    if owner is not None and not is_owner(owner, who):
        raise mismatch(owner, who, config.database)
    say(f"No login needed: client {config.client_id} is a confidential client (secret from {secret.source});"
        " every run uses client credentials.")
    with groups_authorizer(config, cached_token=False) as authorizer:
        try:
            check = check_access(config, authorizer)
        except globus_sdk.GlobusAPIError as err:
            raise SyncerError(f"Globus Groups refused the client's token: {describe_api_error(err)}") from None
        except globus_sdk.NetworkError as err:
            raise SyncerError(f"Globus Groups could not be reached: {describe_network_error(err)}") from None
    say(f"Client credentials work{_describe_check(check)}.")
