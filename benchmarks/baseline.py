"""The baseline: a plain snapshot script written the way the Globus SDK tutorial shows.

Log in once with the Native App flow (refresh tokens on), keep the tokens in a JSON
file, and on every run: build a RefreshTokenAuthorizer (``on_refresh`` saves renewed
tokens), list my groups, fetch each group with its memberships one after another,
and append a full copy of every membership to a ``snapshots`` table with
sqlite-utils, stamped with the run's time.

    python benchmarks/baseline.py --tokens tokens.json login   # once; prints a URL, reads the code
    python benchmarks/baseline.py --tokens tokens.json --db snapshots.db

Point it at the simulator with GLOBUS_SDK_SERVICE_URL_AUTH / _GROUPS, exactly as
syncer is. The rows are produced by a generator, so sqlite-utils writes them in one
transaction without holding the whole snapshot in memory (a list would be the same
speed and much more memory: this is the generous form of the plain script).
"""

import argparse
import datetime
import json
import os

import globus_sdk
import sqlite_utils
from globus_sdk.scopes import GroupsScopes

CLIENT_ID = "61338d24-54d5-408f-a10d-66c06b59f6d2"  # the tutorial's native app


def load_tokens(path):
    with open(path) as f:
        return json.load(f)


def save_tokens(path, tokens):
    with open(path, "w") as f:
        json.dump(tokens, f)
    os.chmod(path, 0o600)


def login(auth_client, path):
    auth_client.oauth2_start_flow(GroupsScopes.view_my_groups_and_memberships, refresh_tokens=True)
    print(f"Please go to this URL and login:\n\n{auth_client.oauth2_get_authorize_url()}\n", flush=True)
    auth_code = input("Please enter the code you get after login here: ").strip()
    token_response = auth_client.oauth2_exchange_code_for_tokens(auth_code)
    save_tokens(path, token_response.by_resource_server["groups.api.globus.org"])
    print("\nTokens saved to", path)


def snapshot(auth_client, token_path, db_path):
    tokens = load_tokens(token_path)

    def on_refresh(token_response):
        save_tokens(token_path, token_response.by_resource_server["groups.api.globus.org"])

    authorizer = globus_sdk.RefreshTokenAuthorizer(
        tokens["refresh_token"],
        auth_client,
        access_token=tokens["access_token"],
        expires_at=tokens["expires_at_seconds"],
        on_refresh=on_refresh,
    )
    groups_client = globus_sdk.GroupsClient(authorizer=authorizer)
    run_at = datetime.datetime.now(datetime.UTC).isoformat()

    def rows():
        for group in groups_client.get_my_groups():
            detail = groups_client.get_group(group["id"], include="memberships")
            for membership in detail["memberships"]:
                yield {
                    "run_at": run_at,
                    "group_id": group["id"],
                    "group_name": detail["name"],
                    "identity_id": membership["identity_id"],
                    "username": membership["username"],
                    "role": membership["role"],
                    "status": membership["status"],
                    "membership_fields": membership.get("membership_fields"),
                }

    db = sqlite_utils.Database(db_path)
    db["snapshots"].insert_all(rows())
    print(f"snapshot {run_at} saved to {db_path}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="tokens.json")
    parser.add_argument("--db", default="snapshots.db")
    parser.add_argument("command", nargs="?", default="snapshot", choices=["login", "snapshot"])
    args = parser.parse_args()
    auth_client = globus_sdk.NativeAppAuthClient(CLIENT_ID)
    if args.command == "login" or not os.path.exists(args.tokens):
        login(auth_client, args.tokens)
    if args.command == "snapshot":
        snapshot(auth_client, args.tokens, args.db)


if __name__ == "__main__":
    main()
