"""Globus Auth: the native app login flow, logout, and the renewing authorizer.

``login`` runs the Native App flow (PKCE, ``access_type=offline`` so Globus issues a
refresh token) and stores the tokens. Syncs then use ``authorizer_from_store``: a
``RefreshTokenAuthorizer`` whose ``on_refresh`` writes renewed tokens back, made safe
to share between the threads that read groups concurrently.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import typing as t
import webbrowser

import globus_sdk
from globus_sdk.transport import RequestsTransport, RetryCheck, RetryCheckResult, RetryConfig, RetryContext

from syncer.config import Config
from syncer.errors import LoginRequired, SyncerError
from syncer.token_store import GROUPS_RESOURCE_SERVER, TokenStore

log = logging.getLogger(__name__)

# Bounded retries: with the SDK's exponential backoff (at most max_sleep each) one
# request costs at most (retries + 1) * timeout + retries * max_sleep.
MAX_RETRIES = 3
MAX_RETRY_SLEEP = 20.0


def client_options(config: Config, checks: t.Sequence[RetryCheck] = ()) -> dict[str, t.Any]:
    """Transport and retry settings shared by every Globus client syncer makes.

    ``checks`` run before the SDK's standard retry checks (which the client adds).
    """
    retry_config = RetryConfig(max_retries=MAX_RETRIES, max_sleep=MAX_RETRY_SLEEP)
    retry_config.checks.register_many_checks([check_session_required, *checks])
    return {
        "transport": RequestsTransport(http_timeout=config.http_timeout),
        "retry_config": retry_config,
    }


def check_session_required(ctx: RetryContext) -> RetryCheckResult:
    """Do not renew the token for a 401 that asks for a new session, not a new token.

    Globus answers 401 with ``authorization_parameters`` when a resource's session
    policy (high assurance, a required identity) is not met; a refreshed token has the
    same session, so renewing would only cost a refresh per such request.
    """
    response = ctx.response
    if response is None or response.status_code != 401:
        return RetryCheckResult.no_decision
    try:
        body = response.json()
    except ValueError:
        return RetryCheckResult.no_decision
    if isinstance(body, dict) and body.get("authorization_parameters"):
        return RetryCheckResult.do_not_retry
    return RetryCheckResult.no_decision


def auth_client(config: Config) -> globus_sdk.NativeAppAuthClient:
    return globus_sdk.NativeAppAuthClient(config.client_id, **client_options(config))


def is_invalid_grant(err: globus_sdk.GlobusAPIError) -> bool:
    """True when Globus Auth refused a grant (revoked or expired refresh token).

    Globus answers ``{"error": "invalid_grant"}`` with HTTP 400 (some deployments
    401); the SDK leaves ``err.code`` empty for that body, so read the raw JSON.
    """
    body = err.raw_json if isinstance(err.raw_json, dict) else {}
    return body.get("error") == "invalid_grant"


def describe_api_error(err: globus_sdk.GlobusAPIError) -> str:
    """A one-line description of an API error that never includes request headers."""
    body = err.raw_json if isinstance(err.raw_json, dict) else {}
    code = err.code if err.code and err.code != "Error" else body.get("error") or ""
    detail = body.get("detail") or body.get("error_description") or err.message or ""
    parts = [f"HTTP {err.http_status}", str(code), str(detail)[:200]]
    return " ".join(p for p in parts if p)


class SharedRefreshTokenAuthorizer(globus_sdk.RefreshTokenAuthorizer):
    """A ``RefreshTokenAuthorizer`` that many threads may use at once.

    The SDK's authorizer is not thread-safe: two threads meeting an expired token
    would both refresh. Here one lock covers checking, refreshing and the
    ``on_refresh`` write, and a 401 only invalidates the token if it is the one the
    failing thread was given (another thread may already have renewed it), so a burst
    of 401s costs one refresh, never several. A failed refresh ends the run: it is
    remembered, and every later caller gets the same error without asking Globus
    again (``LoginRequired`` for a refused refresh token). Otherwise each group read
    would retry the refresh in turn and fail as if the group were at fault.
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        self._lock = threading.RLock()
        self._given = threading.local()
        self._refresh_failed: SyncerError | None = None
        super().__init__(*args, **kwargs)

    def _get_new_access_token(self) -> None:
        if self._refresh_failed is not None:
            raise self._refresh_failed
        try:
            super()._get_new_access_token()
        except globus_sdk.AuthAPIError as err:
            if is_invalid_grant(err):
                self._refresh_failed = LoginRequired("Globus Auth rejected the stored refresh token")
            else:
                self._refresh_failed = SyncerError(f"could not renew the access token: {describe_api_error(err)}")
            raise self._refresh_failed from None
        except globus_sdk.NetworkError as err:
            reason = type(err.underlying_exception).__name__
            self._refresh_failed = SyncerError(f"could not renew the access token: network error: {reason}")
            raise self._refresh_failed from None

    def get_authorization_header(self) -> str:
        with self._lock:
            header = super().get_authorization_header()
            self._given.token = self.access_token
            return header

    def handle_missing_authorization(self) -> bool:
        with self._lock:
            if getattr(self._given, "token", None) != self.access_token:
                return True  # already renewed by another thread: just retry
            return super().handle_missing_authorization()

    def ensure_valid_token(self) -> None:
        with self._lock:
            super().ensure_valid_token()


class _WriteBack:
    """``on_refresh``: store renewed tokens, but only over the grant they renew.

    The authorizer calls it under its lock, so calls never overlap.
    """

    def __init__(self, store: TokenStore, refresh_token: str) -> None:
        self.store = store
        self.grant = refresh_token  # the refresh token the next renewal uses

    def __call__(self, response: globus_sdk.OAuthTokenResponse) -> None:
        renewed_from = self.grant
        issued = response.by_resource_server.get(GROUPS_RESOURCE_SERVER, {})
        self.grant = issued.get("refresh_token") or renewed_from
        if not self.store.save_renewal(response, renewed_from):
            log.warning(
                "the stored tokens changed during this run (a `syncer login` or `logout` meanwhile); "
                "the renewed access token serves this run only and was not stored"
            )


def authorizer_from_store(config: Config, store: TokenStore) -> SharedRefreshTokenAuthorizer:
    """Build the renewing authorizer from stored tokens; renewals are written back
    unless a login or logout replaced the stored tokens meanwhile."""
    tokens = store.groups_tokens()
    if tokens is None:
        raise LoginRequired(f"not logged in (no tokens in {store.path})")
    if not tokens.refresh_token:
        raise LoginRequired(f"the stored tokens in {store.path} have no refresh token")
    return SharedRefreshTokenAuthorizer(
        tokens.refresh_token,
        auth_client(config),
        access_token=tokens.access_token,
        expires_at=tokens.expires_at_seconds,
        on_refresh=_WriteBack(store, tokens.refresh_token),
    )


def _identity_label(groups: list[dict[str, t.Any]]) -> str | None:
    for group in groups:
        for membership in group.get("my_memberships") or []:
            if membership.get("username"):
                return str(membership["username"])
    return None


def login(
    config: Config,
    store: TokenStore,
    *,
    no_browser: bool,
    get_code: t.Callable[[str], str],
    say: t.Callable[[str], None],
) -> None:
    """Run the Native App flow, store the tokens and confirm with one Groups call.

    ``get_code(authorize_url)`` obtains the authorization code (from stdin for
    ``--no-browser``, a prompt otherwise; the demo visits the URL itself);
    ``say`` prints to the user.
    """
    client = auth_client(config)
    flow = client.oauth2_start_flow(requested_scopes=list(config.scopes), refresh_tokens=True)
    url = flow.get_authorize_url()
    if no_browser:
        say("Open this URL, log in, and paste the authorization code below:")
        say(url)
    else:
        say("Opening your browser to log in to Globus. If it does not open, visit:")
        say(url)
        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(url, new=1)
    code = get_code(url).strip()
    if not code:
        raise SyncerError("no authorization code given; nothing changed")
    try:
        response = flow.exchange_code_for_tokens(code)
    except globus_sdk.AuthAPIError as err:
        raise SyncerError(f"Globus Auth refused the code: {describe_api_error(err)}") from None
    if GROUPS_RESOURCE_SERVER not in response.by_resource_server:
        raise SyncerError(
            "Globus Auth issued no token for Globus Groups; check `scopes` includes the groups scope"
        )
    if not response.by_resource_server[GROUPS_RESOURCE_SERVER].get("refresh_token"):
        raise SyncerError("Globus Auth issued no refresh token; unattended syncs need one")
    store.save(response)
    authorizer = authorizer_from_store(config, store)
    groups_client = globus_sdk.GroupsClient(authorizer=authorizer, **client_options(config))
    try:
        groups = list(groups_client.get_my_groups(statuses=list(config.my_statuses)))
    except globus_sdk.GlobusAPIError as err:
        raise SyncerError(
            f"logged in, but Globus Groups refused the new token: {describe_api_error(err)}"
        ) from None
    who = _identity_label(groups)
    say(
        f"Logged in{' as ' + who if who else ''}: {len(groups)} group(s) visible. "
        f"Tokens stored in {store.path}"
    )


def logout(config: Config, store: TokenStore, say: t.Callable[[str], None]) -> bool:
    """Revoke every stored token at Globus Auth, then delete them.

    Tokens are deleted only once Globus confirmed the revocation, so a network
    failure leaves the user able to try again. Returns False when nothing was stored.
    """
    tokens = store.all_tokens()
    if not tokens:
        say(f"Not logged in (no tokens in {store.path}).")
        return False
    client = auth_client(config)
    try:
        for data in tokens.values():
            # revoking the refresh token also ends access tokens issued from it
            for token in (data.refresh_token, data.access_token):
                if token:
                    client.oauth2_revoke_token(token)
    except globus_sdk.GlobusError as err:
        detail = describe_api_error(err) if isinstance(err, globus_sdk.GlobusAPIError) else type(err).__name__
        raise SyncerError(
            f"could not revoke tokens at Globus Auth ({detail}); tokens kept in {store.path}, try again"
        ) from None
    store.clear()
    say(f"Logged out: tokens revoked at Globus Auth and deleted from {store.path}")
    return True
