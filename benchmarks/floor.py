"""The floor: fetch the documents a sync fetches, and do nothing else.

    python benchmarks/floor.py TOKEN_FILE IDS_FILE [--concurrency 8]

The cheapest any client could read Globus: ``GET my_groups`` (all statuses, as syncer
asks), then ``GET groups/ID?include=memberships`` for each group id in IDS_FILE (one
per line), 8 at a time, each thread with its own keep-alive ``requests.Session``, all
with the access token in TOKEN_FILE (the one syncer's store holds). Each body is read
in full and dropped: no JSON parsing, no storage, no SDK. ``bench.py`` runs it as a
child process like syncer, interpreter start-up included, and divides syncer's CPU per
group by this one's. Point it at the simulator with GLOBUS_SDK_SERVICE_URL_GROUPS.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading

import requests

STATUSES = "active,invited,pending,rejected,removed,left,declined"


def fetch_all(base: str, token: str, ids: list[str], concurrency: int) -> int:
    """Fetch the listing and every group; the number of bytes received."""
    headers = {"Authorization": f"Bearer {token}"}
    with requests.Session() as session:
        listing = session.get(f"{base}v2/groups/my_groups", params={"statuses": STATUSES}, headers=headers)
        listing.raise_for_status()
        received = len(listing.content)
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for group_id in ids:
        todo.put(group_id)
    totals: list[int] = []
    failures: list[str] = []

    def work() -> None:
        got = 0
        with requests.Session() as session:
            while True:
                try:
                    group_id = todo.get_nowait()
                except queue.Empty:
                    break
                response = session.get(
                    f"{base}v2/groups/{group_id}", params={"include": "memberships"}, headers=headers
                )
                if response.status_code != 200:
                    failures.append(f"{group_id}: HTTP {response.status_code}")
                got += len(response.content)
        totals.append(got)

    threads = [threading.Thread(target=work) for _ in range(min(concurrency, len(ids)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"floor: {len(failures)} reads failed, e.g. {failures[0]}")
    return received + sum(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("token_file")
    parser.add_argument("ids_file")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with open(args.token_file) as f:
        token = f.read().strip()
    with open(args.ids_file) as f:
        ids = f.read().split()
    received = fetch_all(os.environ["GLOBUS_SDK_SERVICE_URL_GROUPS"], token, ids, args.concurrency)
    print(f"{len(ids)} groups, {received} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
