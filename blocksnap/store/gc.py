"""Garbage collection: plan, then execute (restic's prune is the model).

The plan lists what is removable: snapshots past their ExpiredTime
(RetentionDays), index entries at refcount zero (deleted snapshots whose
space was not reclaimed at once, or data of failed or killed creates), pack
files no index entry names (a killed create's packs), and reclaim work a
crash interrupted. It can be printed as a dry run. Executing it holds the
repository lock exclusively, so no create can be about to reference a chunk
being removed.
"""
import datetime
import os
import time

from .. import errors
from . import meta


def _expired(rec, now):
    exp = rec.get("ExpiredTime")
    if not exp or rec["Status"] == "progressing":
        return False
    t = datetime.datetime.strptime(exp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return t.timestamp() <= now


def plan(repo, now=None):
    """What gc would do, as a dict of lists and byte counts. Changes nothing.

    The expired snapshots count as deleted: their chunks that nothing else references are among
    DeadChunks, as gc will find them after deleting the snapshots.
    """
    now = time.time() if now is None else now
    cat = repo.catalog
    dead, dead_bytes, named, pending = [], 0, set(), 0
    with cat.read() as txn:
        expired = [r["SnapshotId"] for r in cat.iter_json(txn, "snapshots") if _expired(r, now)]
        dying = repo.chunks_freed_by(txn, expired)
        with txn.cursor(db=cat.db["chunks"]) as cur:
            for key, val in cur:
                entry = meta.CHUNK.unpack(val)
                named.add(entry[0])
                if entry[5] == 0 or key in dying:
                    dead.append(key)
                    dead_bytes += entry[2]
        pending = txn.stat(cat.db["reclaim"])["entries"]
    # An orphan is a pack no index entry names: a killed create's (never in the packs table), or
    # one whose every record another process stored first (in the packs table at live 0 before
    # that case removed it at once).
    orphans = [p for p in repo.packs.list_packs() if p not in named]
    orphan_bytes = 0
    for p in orphans:
        try:
            orphan_bytes += os.stat(repo.packs.path(p)).st_blocks * 512
        except FileNotFoundError:
            pass
    return {
        "ExpiredSnapshots": expired,
        "DeadChunks": dead,
        "DeadBytes": dead_bytes,
        "OrphanPacks": orphans,
        "OrphanBytes": orphan_bytes,
        "PendingReclaim": pending,
    }


def dry_run(repo, on_wait=None):
    """The plan gc would carry out now: made under the same exclusive lock, so a running create's
    packs and its not yet referenced chunks are not counted as removable."""
    lock = repo.lock_exclusive(on_wait)
    try:
        return plan(repo)
    finally:
        lock.release()


def execute(repo, on_wait=None):
    """Make a fresh plan under the exclusive lock and carry it out; returns it with FreedBytes.

    Args:
        on_wait: called once, with no arguments, if creates, restores or verifies are running
            and gc has to wait for them to finish.
    """
    lock = repo.lock_exclusive(on_wait)
    try:
        before = repo.packs.disk_usage()
        expired = plan(repo)["ExpiredSnapshots"]
        for sid in expired:
            try:
                repo.delete_snapshot(sid, reclaim=False)
            except errors.InvalidSnapshotIdNotFound:
                pass  # deleted meanwhile
        p = plan(repo)
        p["ExpiredSnapshots"] = expired
        repo.reclaim_dead(p["DeadChunks"])
        if p["OrphanPacks"]:
            with repo.catalog.write() as txn:  # the name first: a crash then leaves a plain orphan file
                for pid in p["OrphanPacks"]:
                    txn.delete(pid, db=repo.catalog.db["packs"])
        for pid in p["OrphanPacks"]:
            repo.packs.remove(pid)
        repo.process_reclaim()
        p["FreedBytes"] = max(0, before - repo.packs.disk_usage())
    finally:
        lock.release()
    return p
