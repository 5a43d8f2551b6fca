"""Globus Auth: the renewing authorizers every run uses, and logout.

(``syncer.globus.login`` has the login flows; they are kept apart because their imports,
a local HTTP server among them, would cost every run start-up time.) Syncs use
``groups_authorizer``: a ``RefreshTokenAuthorizer`` whose
``on_refresh`` writes renewed tokens back, or for a confidential client a
``ClientCredentialsAuthorizer`` whose tokens are cached in the token store; both made
safe to share between the threads that read groups concurrently.
"""

from __future__ import annotations

import contextlib
import os
import threading
import typing as t
import urllib.parse
from pathlib import Path

import globus_sdk
import globus_sdk.gare
import requests
from globus_sdk.transport import RequestsTransport, RetryCheck, RetryCheckResult, RetryConfig, RetryContext

from syncer.config import Config, is_groups_scope
from syncer.errors import ConfigError, LoginRequired, SyncerError
from syncer.globus.client_secret import ClientSecret, load_client_secret
from syncer.globus.token_store import GROUPS_RESOURCE_SERVER, TokenStore
from syncer.logs import module_logger
from syncer.storage.ownership import CLIENT, IDENTITY, Credentials

log = module_logger(__name__)


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
        "transport": RequestsTransport(http_timeout=config.http_timeout, verify_ssl=trusted_cas()),
        "retry_config": retry_config,
    }


#: where requests and OpenSSL are told which CAs to trust, in the order they count:
#: GLOBUS_SDK_VERIFY_SSL (the SDK's own; also "false"), then as requests reads them
CA_VARIABLES = ("GLOBUS_SDK_VERIFY_SSL", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


#: GLOBUS_SDK_VERIFY_SSL's switch values (the SDK's): off, then on
_SWITCHES = ("0", "f", "n", "false", "no", "off", "1", "t", "y", "true", "yes", "on")


def trusted_cas() -> str | None:
    """The CA bundle file that requests to Globus are verified against, from
    the environment; None: the SDK's own choice (GLOBUS_SDK_VERIFY_SSL, else certifi's).

    globus-sdk sends with ``Session.send()``, which never reads ``REQUESTS_CA_BUNDLE``
    or ``CURL_CA_BUNDLE`` (only ``Session.request()`` does), and requests verifies
    against certifi's bundle, not OpenSSL's ``SSL_CERT_FILE``: so behind a
    TLS-inspecting proxy every request would fail although the site's CA is
    configured. A variable naming no file or folder is a configuration error.
    """
    for name in CA_VARIABLES:
        value = os.environ.get(name)
        if not value:
            continue
        if name == "GLOBUS_SDK_VERIFY_SSL" and value.lower() in _SWITCHES:
            if value.lower() in _SWITCHES[:6]:
                return None  # verification off: the SDK reads that itself
            continue  # "on": verified against the bundles named below, if any
        if not Path(value).is_file():  # the SDK takes files only
            raise ConfigError(f"environment variable {name}: {value} is not a file (a CA bundle is expected)")
        return value
    return None


def describe_network_error(err: globus_sdk.NetworkError) -> str:
    """One line for a failed connection; a certificate that is not trusted says how to
    trust it (sites behind TLS-inspecting proxies)."""
    cause = err.underlying_exception
    if isinstance(cause, requests.exceptions.SSLError):
        host = urllib.parse.urlsplit(getattr(cause.request, "url", "") or "").hostname or "Globus"
        return (
            f"TLS certificate of {host} not trusted; behind a TLS-inspecting proxy, point"
            " REQUESTS_CA_BUNDLE (or SSL_CERT_FILE, CURL_CA_BUNDLE, GLOBUS_SDK_VERIFY_SSL) at its CA bundle"
        )
    if isinstance(cause, requests.exceptions.ProxyError):
        return "network error: the proxy (HTTPS_PROXY/HTTP_PROXY) refused or could not be reached"
    return f"network error: {type(cause).__name__}"


def check_session_required(ctx: RetryContext) -> RetryCheckResult:
    """Do not renew the token for a 401 that asks for a new session, not a new token.

    Globus answers 401 with a session requirement when a resource's session policy
    (high assurance, a required identity or domain, MFA) is not met; a refreshed
    token has the same session, so renewing would only cost a refresh per such
    request. Any other 401 (an expired or revoked token) is left to the SDK, which
    renews the token once and retries.
    """
    response = ctx.response
    if response is None or response.status_code != 401:
        return RetryCheckResult.no_decision
    if session_requirement(globus_sdk.GlobusAPIError(response)) is not None:
        return RetryCheckResult.do_not_retry
    return RetryCheckResult.no_decision


# The fields of a Globus Auth requirements error that ask for a new session (SPEC,
# "Session policies"); others (required_scopes, prompt) do not make a group's read
# a session problem.
SESSION_FIELDS = (
    "session_required_identities",
    "session_required_single_domain",
    "session_required_policies",
)


def session_requirement(err: globus_sdk.GlobusAPIError) -> str | None:
    """What a 401 asks for when it is a session requirement, as one line; None otherwise.

    Classified with the SDK's own parser (``globus_sdk.gare.to_gare``), never by the
    presence of ``authorization_parameters``: Globus's documented 401 body always
    carries that key, often with nothing in it, and then it is a token problem.
    """
    if err.http_status != 401:
        return None
    gare = globus_sdk.gare.to_gare(err)
    if gare is None:
        return None
    params = gare.authorization_parameters
    asked = [f"{name}={','.join(value)}" for name in SESSION_FIELDS if (value := getattr(params, name))]
    if params.session_required_mfa:
        asked.append("session_required_mfa=true")
    return "; ".join(asked)[:500] or None


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


class _SharedRenewal:
    """Makes one of the SDK's renewing authorizers safe for many threads at once.

    The SDK's authorizers are not thread-safe: two threads meeting an expired token
    would both renew. Here one lock covers checking, renewing and the ``on_refresh``
    write, and a 401 only invalidates the token if it is the one the failing thread
    was given (another thread may already have renewed it), so a burst of 401s costs
    one renewal, never several. A failed renewal ends the run: it is remembered, and
    every later caller gets the same error without asking Globus again. Otherwise
    each group read would retry the renewal in turn and fail as if the group were at
    fault.
    """

    #: who the credentials act as, where known (see ``syncer.storage.ownership``)
    credentials: Credentials | None = None

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        self._lock = threading.RLock()
        self._given = threading.local()
        self._refresh_failed: SyncerError | None = None
        with self._renewing():  # given no token, the SDK gets one here
            super().__init__(*args, **kwargs)

    def _renewal_refused(self, err: globus_sdk.AuthAPIError) -> SyncerError:
        """The error that ends the run when Globus Auth refuses a renewal."""
        return SyncerError(f"could not renew the access token: {describe_api_error(err)}")

    @contextlib.contextmanager
    def _renewing(self) -> t.Iterator[None]:
        """Around whatever may renew the token: a failed renewal becomes the error that
        ends the run, and is final (a failed renewal leaves the token as it was, expired
        or invalidated, so every later use would renew again)."""
        if self._refresh_failed is not None:
            raise self._refresh_failed
        try:
            yield
        except globus_sdk.AuthAPIError as err:
            self._refresh_failed = self._renewal_refused(err)
            raise self._refresh_failed from None
        except globus_sdk.NetworkError as err:
            self._refresh_failed = SyncerError(f"could not renew the access token: {describe_network_error(err)}")
            raise self._refresh_failed from None

    def get_authorization_header(self) -> str:
        with self._lock:
            header: str = super().get_authorization_header()  # type: ignore[misc]
            self._given.token = self.access_token  # type: ignore[attr-defined]
            return header

    def handle_missing_authorization(self) -> bool:
        with self._lock:
            if getattr(self._given, "token", None) != self.access_token:  # type: ignore[attr-defined]
                return True  # already renewed by another thread: just retry
            return bool(super().handle_missing_authorization())  # type: ignore[misc]

    def ensure_valid_token(self) -> None:
        """The SDK renews here (``get_authorization_header`` calls it), one thread at a time."""
        with self._lock, self._renewing():
            super().ensure_valid_token()  # type: ignore[misc]


class SharedRefreshTokenAuthorizer(_SharedRenewal, globus_sdk.RefreshTokenAuthorizer):
    """A ``RefreshTokenAuthorizer`` that many threads may use at once (see ``_SharedRenewal``).

    A refused refresh token (``invalid_grant``) is ``LoginRequired``, and ``on_rejected``
    is told, so the token store can say a login is needed until one is done.
    """

    def __init__(self, *args: t.Any, on_rejected: t.Callable[[], None] | None = None, **kwargs: t.Any) -> None:
        self._on_rejected = on_rejected
        super().__init__(*args, **kwargs)

    def _renewal_refused(self, err: globus_sdk.AuthAPIError) -> SyncerError:
        if not is_invalid_grant(err):
            return super()._renewal_refused(err)
        if self._on_rejected is not None:
            self._on_rejected()
        return LoginRequired("Globus Auth rejected the stored refresh token")


class SharedClientCredentialsAuthorizer(_SharedRenewal, globus_sdk.ClientCredentialsAuthorizer):
    """A ``ClientCredentialsAuthorizer`` that many threads may use at once.

    A refused secret is a configuration error that names where the secret came from
    (never the secret).
    """

    def __init__(self, *args: t.Any, secret_source: str, **kwargs: t.Any) -> None:
        self._secret_source = secret_source
        super().__init__(*args, **kwargs)

    def _renewal_refused(self, err: globus_sdk.AuthAPIError) -> SyncerError:
        body = err.raw_json if isinstance(err.raw_json, dict) else {}
        if body.get("error") == "invalid_client" or err.http_status == 401:
            return ConfigError(
                f"Globus Auth rejected the client secret from {self._secret_source} for client"
                f" {self.confidential_client.client_id}: {describe_api_error(err)}"
            )
        return SyncerError(f"could not get an access token with client credentials: {describe_api_error(err)}")


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

    def rejected(self) -> None:
        self.store.mark_rejected(self.grant)


def authorizer_from_store(config: Config, store: TokenStore) -> SharedRefreshTokenAuthorizer:
    """Build the renewing authorizer from stored tokens; renewals are written back
    unless a login or logout replaced the stored tokens meanwhile."""
    tokens = store.groups_tokens()
    if tokens is None:
        raise LoginRequired(f"not logged in (no tokens in {store.path})")
    store.check_issuer()
    if not tokens.refresh_token:
        raise LoginRequired(f"the stored tokens in {store.path} have no refresh token")
    write_back = _WriteBack(store, tokens.refresh_token)
    authorizer = SharedRefreshTokenAuthorizer(
        tokens.refresh_token,
        auth_client(config),
        access_token=tokens.access_token,
        expires_at=tokens.expires_at_seconds,
        on_refresh=write_back,
        on_rejected=write_back.rejected,
    )
    # a login made before owners were recorded stored no identity: then the run tells
    # it from the listing (see syncer.operations.sync)
    if tokens.identity_id:
        authorizer.credentials = Credentials(IDENTITY, tokens.identity_id, None)
    return authorizer


def client_credentials_namespace(config: Config) -> str:
    """The token store namespace for a confidential client's cached tokens."""
    return f"client_credentials:{config.client_id}"


def open_token_store(config: Config, secret: ClientSecret | None) -> TokenStore:
    """The token store, in the namespace of the client that uses it: a login's tokens,
    or with ``secret`` the confidential client's cached ones."""
    namespace = client_credentials_namespace(config) if secret else "DEFAULT"
    return TokenStore(config.token_storage, namespace=namespace)


def client_credentials_authorizer(
    config: Config, secret: ClientSecret, store: TokenStore, cached_token: bool = True
) -> SharedClientCredentialsAuthorizer:
    """Client credentials for a confidential client; tokens cached in ``store``
    (a namespace of its own) so that each run does not need a new one.

    A cached token is used only with the secret it was issued for: after a rotation
    (or a wrong secret put in place) the first request asks Globus Auth, so a
    rejected secret is a 78 now, not when the cached token expires. Without
    ``cached_token`` Globus Auth is asked in any case (``syncer login``'s check).
    """
    scopes = sorted(scope for scope in config.scopes if is_groups_scope(scope))  # one resource server
    cached = store.groups_tokens() if cached_token else None
    usable = (
        cached is not None and sorted(cached.scope.split()) == scopes and store.issued_for(secret)
        and store.issued_here()
    )
    client = globus_sdk.ConfidentialAppAuthClient(config.client_id, secret.value, **client_options(config))
    authorizer = SharedClientCredentialsAuthorizer(
        client,
        scopes,
        access_token=cached.access_token if usable and cached else None,
        expires_at=cached.expires_at_seconds if usable and cached else None,
        on_refresh=lambda response: store.save_issued_for(response, secret),
        secret_source=secret.source,
    )
    authorizer.credentials = Credentials(CLIENT, config.client_id, None)  # a client acts as itself
    return authorizer


@contextlib.contextmanager
def groups_authorizer(
    config: Config, cached_token: bool = True
) -> t.Iterator[globus_sdk.authorizers.GlobusAuthorizer]:
    """The authorizer every run uses: client credentials when a client secret is
    configured, else the stored login's refresh token. Its token store stays open
    for the block (renewals are written back to it). ``cached_token=False``: a
    confidential client gets a new token from Globus Auth whatever is cached."""
    secret = load_client_secret(config)
    with open_token_store(config, secret) as store:
        if secret is not None:
            yield client_credentials_authorizer(config, secret, store, cached_token)
        else:
            yield authorizer_from_store(config, store)


def logout(
    config: Config, store: TokenStore, say: t.Callable[[str], None], secret: ClientSecret | None = None
) -> bool:
    """Revoke every stored token at Globus Auth, then delete them: a login's, or with
    ``secret`` a confidential client's cached ones (revoked as that client).

    Tokens are deleted only once Globus confirmed the revocation, so a network
    failure leaves the user able to try again. Returns False when nothing was stored.
    """
    tokens = store.all_tokens()
    if not tokens:
        say(f"Not logged in (no tokens in {store.path}).")
        return False
    store.check_issuer(f"Log out where they came from, or delete {store.path}.")
    client: globus_sdk.AuthLoginClient = (
        globus_sdk.ConfidentialAppAuthClient(config.client_id, secret.value, **client_options(config))
        if secret else auth_client(config)
    )
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
