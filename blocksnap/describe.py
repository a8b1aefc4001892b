"""DescribeSnapshots and DescribeDisks: filters, pages and the cloud's fields, served from the catalog's indexes.

A query is a set of index lists (``catalog.Posting``: the records whose field has one value, in creation
order) that every answer is on. Their intersection is walked in creation order by leapfrogging: each list
seeks to the order key the others reached, so a page costs the index keys before it and the records on it,
never a read of every record. ``TotalCount`` is one stored count when a single list decides the answer,
else a walk of the intersection's keys (still no record is read).

Paging is the cloud's two styles (docs/API.md, "DescribeSnapshots and DescribeDisks"): ``PageNumber`` (from
1, default 1) with ``PageSize`` (1-100, default 10); or ``MaxResults`` with ``NextToken``, an opaque token
naming the order key the next page starts at, the page's ordinal and the query it belongs to. A catalog
without indexes (version 2 on read-only media) is answered by reading every record, with the same filters.
"""
import bisect
import json

from . import _native, errors
from .store import catalog as cat

PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
SNAPSHOT_MAX_RESULTS = (1, 100)   # DescribeSnapshots: MaxResults up to 100, default 10
DISK_MAX_RESULTS = (10, 500)      # DescribeDisks: below 10 counts as 10, above 500 as 500 (the reference's rule)
MAX_IDS = 100                     # SnapshotIds / DiskIds: a JSON array of up to 100 ids
STATUSES = ("progressing", "accomplished", "failed", "all")
SNAPSHOT_TYPES = ("auto", "user", "all")
DISK_TYPES = ("all", "system", "data")
DISK_STATUSES = ("In_use", "Available", "Attaching", "Detaching", "Creating", "ReIniting", "All")
LOCK_REASONS = ("financial", "security")


def _shown(value, limit=64):
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


# --- lists that are not in the catalog: a few ids, and a list with some entries added or taken out ------
class ListPosting:
    """A posting of ``(order key, id)`` pairs held in memory (SnapshotIds, the settled dead creates)."""

    def __init__(self, items):
        self.items = sorted(items)
        self._keys = [k for k, _ in self.items]

    def seek(self, order=b""):
        i = bisect.bisect_left(self._keys, order)
        return self.items[i] if i < len(self.items) else None

    def seek_key(self, order=b""):
        hit = self.seek(order)
        return None if hit is None else hit[0]

    def keys(self, order=b""):
        return iter(self._keys[bisect.bisect_left(self._keys, order):])

    def count(self):
        return len(self.items)


class IndexPosting:
    """A catalog index list with its stored count."""

    def __init__(self, txn, kind, field, value):
        self._p = txn.posting(kind, field, value)
        self._n = txn.index_count(kind, field, value)

    def seek(self, order=b""):
        return self._p.seek(order)

    def seek_key(self, order=b""):
        return self._p.seek_key(order)

    def keys(self, order=b""):
        return self._p.keys(order)

    def count(self):
        return self._n


class Union:
    """Entries on either list (an index list and a few more)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def seek(self, order=b""):
        x, y = self.a.seek(order), self.b.seek(order)
        if x is None or y is None:
            return x or y
        return min(x, y)

    def seek_key(self, order=b""):
        x, y = self.a.seek_key(order), self.b.seek_key(order)
        if x is None or y is None:
            return x or y
        return min(x, y)

    def keys(self, order=b""):
        key = self.seek_key(order)
        while key is not None:
            yield key
            key = self.seek_key(key + b"\0")

    def count(self):
        return None


class Minus:
    """Entries of a list but those whose order key is in ``excluded``."""

    def __init__(self, base, excluded):
        self.base, self.excluded = base, set(excluded)

    def seek(self, order=b""):
        hit = self.base.seek(order)
        while hit is not None and hit[0] in self.excluded:
            hit = self.base.seek(hit[0] + b"\0")
        return hit

    def seek_key(self, order=b""):
        key = self.base.seek_key(order)
        while key is not None and key in self.excluded:
            key = self.base.seek_key(key + b"\0")
        return key

    def keys(self, order=b""):
        return (k for k in self.base.keys(order) if k not in self.excluded)

    def count(self):
        return None


def intersect(postings, order=b""):
    """``(order key, id)`` of the entries on every posting, from ``order`` on, in order (leapfrog join)."""
    first, rest = postings[0], postings[1:]
    while True:
        hit = first.seek(order)
        if hit is None:
            return
        order = hit[0]
        for p in rest:
            other = p.seek(order)
            if other is None:
                return
            if other[0] != order:
                order = other[0]
                break
        else:
            yield hit
            order += b"\0"  # the smallest key after this one


def intersect_keys(postings, order=b""):
    """The order keys of :func:`intersect`, no id read: one list is stepped through, several leapfrog."""
    if len(postings) == 1:
        yield from postings[0].keys(order)
        return
    first, rest = postings[0], postings[1:]
    while True:
        key = first.seek_key(order)
        if key is None:
            return
        order = key
        for p in rest:
            other = p.seek_key(order)
            if other is None:
                return
            if other != order:
                order = other
                break
        else:
            yield key
            order += b"\0"


def count(postings):
    """How many entries are on every posting: a stored count when one list decides, else a walk of keys."""
    if len(postings) == 1 and postings[0].count() is not None:
        return postings[0].count()
    return sum(1 for _ in intersect_keys(postings))


# --- paging --------------------------------------------------------------------------------------------
class Paging:
    """What page a request asks for: PageNumber/PageSize, MaxResults/NextToken, or (Python only) everything.

    Args:
        max_results_range: (least, most) MaxResults; DescribeDisks counts values outside as the nearest
            end (``clamp``), DescribeSnapshots refuses them.
    Raises:
        InvalidParameter for a page number below 1, a page size outside 1-100, MaxResults outside its range
        (DescribeSnapshots), a NextToken that is not one of ours.
    """

    def __init__(self, page_number=None, page_size=None, max_results=None, next_token=None, everything=False,
                 max_results_range=SNAPSHOT_MAX_RESULTS, clamp=False):
        self.everything = everything and page_number is None and page_size is None and max_results is None \
            and next_token is None
        self.tokens = max_results is not None or next_token is not None
        if self.tokens:  # "When NextToken is specified, PageSize and PageNumber do not take effect"
            lo, hi = max_results_range
            n = PAGE_SIZE if max_results is None else _whole(max_results, "MaxResults")
            if clamp:
                n = min(max(n, lo), hi)
            elif not lo <= n <= hi:
                raise errors.InvalidParameter(f"(MaxResults must be {lo} to {hi}, got {n})")
            self.size = n
            self.token = None if next_token in (None, "") else _token_parts(next_token)
        else:
            self.number = 1 if page_number is None else _whole(page_number, "PageNumber")
            self.size = PAGE_SIZE if page_size is None else _whole(page_size, "PageSize")
            if self.number < 1:
                raise errors.InvalidParameter(f"(PageNumber counts from 1, got {self.number})")
            if not 1 <= self.size <= MAX_PAGE_SIZE:
                raise errors.InvalidParameter(f"(PageSize must be 1 to {MAX_PAGE_SIZE}, got {self.size})")


def _whole(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isascii() and value.strip().lstrip("-").isdigit():
            return int(value)
        raise errors.InvalidParameter(f"({name} must be a whole number, got {_shown(value)})")
    return value


def _token_parts(token):
    """``(order key, page ordinal, query tag)`` of a NextToken (hex: order key, u32 page, 4-byte tag)."""
    try:
        raw = bytes.fromhex(token) if isinstance(token, str) and token.isascii() else b""
    except ValueError:
        raw = b""
    if len(raw) < 9:
        raise errors.InvalidParameter(f"(NextToken {_shown(token)} is not a token this repository gave)")
    return raw[:-8], int.from_bytes(raw[-8:-4], "big"), raw[-4:]


def _token(order, page, tag):
    return (order + page.to_bytes(4, "big") + tag).hex()


def _query_tag(query):
    """4 bytes naming a query's filters: a NextToken is only good for the query it came from."""
    return _native.hash64(json.dumps(query, sort_keys=True, default=str).encode())[:4]


def page_of(postings, paging, query, read):
    """One page of the intersection of ``postings``.

    Args:
        read: ``(order key, id) -> record`` or None to drop it (a hash collision, a record that no longer
            matches): called for the entries on the page only.
    Returns:
        ``(records, TotalCount, PageNumber, PageSize, NextToken)``.
    """
    total = count(postings)
    tag = _query_tag(query)
    if paging.everything:
        recs = [r for r in (read(hit) for hit in intersect(postings)) if r is not None]
        return recs, len(recs), 1, len(recs), ""
    if not paging.tokens:
        start = b""
        skip = (paging.number - 1) * paging.size
        if skip:  # the keys before the page, stepped over: no id, no record is read for them
            start = None
            for i, key in enumerate(intersect_keys(postings)):
                if i == skip:
                    start = key
                    break
            if start is None:
                return [], total, paging.number, paging.size, ""
        recs = []
        for hit in intersect(postings, start):
            rec = read(hit)
            if rec is not None:
                recs.append(rec)
            if len(recs) == paging.size:
                break
        return recs, total, paging.number, paging.size, ""
    start, page = b"", 1
    if paging.token is not None:
        start, page, got = paging.token
        if got != tag:
            raise errors.InvalidParameter("(NextToken belongs to a query with other filters)")
    recs, nxt = [], ""
    for hit in intersect(postings, start):
        if len(recs) == paging.size:
            nxt = _token(hit[0], page + 1, tag)
            break
        rec = read(hit)
        if rec is not None:
            recs.append(rec)
    return recs, total, page, paging.size, nxt


def page_of_list(recs, paging, query, order):
    """The same paging over records already in hand, in order (the unindexed catalog; SnapshotIds)."""
    items = [(order(r), r) for r in recs]
    items.sort(key=lambda t: t[0])
    by_order = dict(items)
    lst = ListPosting([(k, k) for k, _ in items])
    return page_of([lst], paging, query, lambda hit: by_order[hit[0]])


# --- snapshots -------------------------------------------------------------------------------------------
class SnapshotQuery:
    """The filters of a DescribeSnapshots request, checked. ``tags``: ``[(key, value or None)]``; a tag
    without a value matches every value of its key; a snapshot must carry every tag given."""

    def __init__(self, disk_id=None, snapshot_ids=None, snapshot_name=None, status=None, snapshot_type=None,
                 category=None, tags=None, resource_group=None):
        if snapshot_ids is not None:
            if isinstance(snapshot_ids, str):  # the cloud API passes a JSON array in a string
                try:
                    snapshot_ids = json.loads(snapshot_ids)
                except ValueError:
                    pass  # still a str: refused just below
            if not isinstance(snapshot_ids, (list, tuple)) or not all(isinstance(x, str) for x in snapshot_ids):
                raise errors.InvalidParameter(f"(SnapshotIds must be a list of SnapshotIds, got "
                                              f"{_shown(snapshot_ids)})")
            if len(snapshot_ids) > MAX_IDS:
                raise errors.InvalidParameter(f"(SnapshotIds holds at most {MAX_IDS} ids, got {len(snapshot_ids)})")
            snapshot_ids = list(dict.fromkeys(snapshot_ids))
        for name, value, allowed in (("Status", status, STATUSES), ("SnapshotType", snapshot_type, SNAPSHOT_TYPES)):
            if value is not None and value not in allowed:
                raise errors.InvalidParameter(f"({name} must be one of {', '.join(allowed)}, got {_shown(value)})")
        for name, value in (("DiskId", disk_id), ("SnapshotName", snapshot_name), ("Category", category),
                            ("ResourceGroupId", resource_group)):
            if value is not None and not isinstance(value, str):
                raise errors.InvalidParameter(f"({name} must be a string, got {_shown(value)})")
        self.disk_id = disk_id or None
        self.snapshot_ids = snapshot_ids
        self.snapshot_name = snapshot_name or None
        self.status = None if status in (None, "all") else status
        self.snapshot_type = None if snapshot_type in (None, "all") else snapshot_type
        self.category = category or None
        self.tags = tag_filters(tags)
        self.resource_group = resource_group  # "" is the default group (the caller maps its id)

    def key(self):
        return {k: v for k, v in vars(self).items() if v is not None}

    def matches(self, rec):
        """True if the record (as readers see it) passes every filter: the check of what an index found."""
        if self.disk_id is not None and rec["SourceDiskId"] != self.disk_id:
            return False
        if self.snapshot_ids is not None and rec["SnapshotId"] not in self.snapshot_ids:
            return False
        if self.snapshot_name is not None and rec.get("SnapshotName") != self.snapshot_name:
            return False
        if self.status is not None and rec["Status"] != self.status:
            return False
        if self.snapshot_type is not None and (rec.get("SnapshotType") or cat.DEFAULT_TYPE) != self.snapshot_type:
            return False
        if self.category is not None and (rec.get("Category") or cat.DEFAULT_CATEGORY) != self.category:
            return False
        if self.resource_group is not None and (rec.get("ResourceGroupId") or "") != self.resource_group:
            return False
        have = {(t["TagKey"], t["TagValue"]) for t in rec.get("Tags") or ()}
        keys = {k for k, _ in have}
        return all((k in keys) if v is None else ((k, v) in have) for k, v in self.tags)

    def postings(self, txn, repo):
        """The index lists of the filters (smallest first), or None if an empty answer is certain."""
        S = cat.KIND_SNAPSHOT
        out = []
        if self.disk_id is not None:
            out.append(IndexPosting(txn, S, cat.F_DISK, self.disk_id.encode()))
        if self.snapshot_name is not None:
            out.append(IndexPosting(txn, S, cat.F_NAME, self.snapshot_name.encode()))
        if self.category is not None:
            out.append(IndexPosting(txn, S, cat.F_CATEGORY, self.category.encode()))
        if self.snapshot_type is not None:
            out.append(IndexPosting(txn, S, cat.F_TYPE, self.snapshot_type.encode()))
        if self.resource_group is not None:
            out.append(IndexPosting(txn, S, cat.F_GROUP, self.resource_group.encode()))
        for key, value in self.tags:
            if value is None:
                out.append(IndexPosting(txn, S, cat.F_TAG_KEY, key.encode()))
            else:
                out.append(IndexPosting(txn, S, cat.F_TAG, cat.tag_term(key, value)))
        if self.snapshot_ids is not None:
            items = []
            for sid in self.snapshot_ids:
                rec = txn.snapshot(sid) if _is_snapshot_id(sid) else None
                if rec is not None and not rec.get("Deleting"):
                    items.append((cat.snapshot_order(rec), sid))
            out.append(ListPosting(items))
        if self.status is not None:
            out.append(self._status_posting(txn, repo))
        if not out:
            out.append(IndexPosting(txn, S, cat.F_ALL, b""))
        known = [p for p in out if p.count() is not None]
        if any(p.count() == 0 for p in known):
            return None
        return sorted(known, key=lambda p: p.count()) + [p for p in out if p.count() is None]

    def _status_posting(self, txn, repo):
        """The records readers see in the asked Status: a create whose process is gone is failed (or
        accomplished, if it stored its object) for them while its record still says progressing."""
        S = cat.KIND_SNAPSHOT
        moved = {}
        for order, sid in txn.posting(S, cat.F_STATUS, b"progressing").walk():
            rec = txn.snapshot(sid)
            if rec is not None:
                seen = repo.view(rec)["Status"]
                if seen != "progressing":
                    moved[order] = (sid, seen)
        base = IndexPosting(txn, S, cat.F_STATUS, self.status.encode())
        if not moved:
            return base
        if self.status == "progressing":
            return Minus(base, moved)
        extra = [(order, sid) for order, (sid, seen) in moved.items() if seen == self.status]
        return Union(base, ListPosting(extra)) if extra else base


def tag_filters(tags):
    """``[(key, value or None)]`` from the API's Tag list (``{"Key", "Value"}`` items, or pairs)."""
    out = []
    for item in tags or ():
        if isinstance(item, dict):
            key, value = item.get("Key"), item.get("Value")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            key, value = item
        else:
            raise errors.InvalidParameter(f"(a Tag filter is {{'Key', 'Value'}}, got {_shown(item)})")
        if not isinstance(key, str) or not key or (value is not None and not isinstance(value, str)):
            raise errors.InvalidParameter(f"(a Tag filter needs a Key and a text Value, got {_shown(item)})")
        out.append((key, value))
    if len(out) > 20:
        raise errors.InvalidParameter(f"(at most 20 Tag filters, got {len(out)})")
    return out


def find_snapshots(repo, query, paging):
    """The page of snapshot records (as readers see them) that ``query`` asks for.

    Returns:
        ``(records, TotalCount, PageNumber, PageSize, NextToken)``.
    """
    key = query.key()
    if not repo.catalog.indexed:
        recs = [r for r in repo.list_snapshots() if query.matches(r)]
        return page_of_list(recs, paging, key, cat.snapshot_order)
    with repo.catalog.read() as txn:
        postings = query.postings(txn, repo)
        if postings is None:
            return page_of([ListPosting([])], paging, key, None)

        def read(hit):
            rec = txn.snapshot(hit[1])
            if rec is None or rec.get("Deleting"):
                return None
            rec = repo.view(rec)
            return rec if query.matches(rec) else None

        return page_of(postings, paging, key, read)


# --- disks -----------------------------------------------------------------------------------------------
class DiskQuery:
    """The filters of a DescribeDisks request, checked."""

    def __init__(self, disk_ids=None, disk_name=None, status=None, disk_type=None, lock_reason=None,
                 resource_group=None):
        if disk_ids is not None:
            if isinstance(disk_ids, str):
                try:
                    disk_ids = json.loads(disk_ids)
                except ValueError:
                    pass
            if not isinstance(disk_ids, (list, tuple)) or not all(isinstance(x, str) for x in disk_ids):
                raise errors.InvalidParameter(f"(DiskIds must be a list of DiskIds, got {_shown(disk_ids)})")
            if len(disk_ids) > MAX_IDS:
                raise errors.InvalidParameter(f"(DiskIds holds at most {MAX_IDS} ids, got {len(disk_ids)})")
            disk_ids = list(dict.fromkeys(disk_ids))
        for name, value, allowed in (("Status", status, DISK_STATUSES), ("DiskType", disk_type, DISK_TYPES),
                                     ("LockReason", lock_reason, LOCK_REASONS)):
            if value is not None and value not in allowed:
                raise errors.InvalidParameter(f"({name} must be one of {', '.join(allowed)}, got {_shown(value)})")
        for name, value in (("DiskName", disk_name), ("ResourceGroupId", resource_group)):
            if value is not None and not isinstance(value, str):
                raise errors.InvalidParameter(f"({name} must be a string, got {_shown(value)})")
        self.disk_ids = disk_ids
        self.disk_name = disk_name or None
        self.status = None if status in (None, "All") else status
        self.disk_type = None if disk_type in (None, "all") else disk_type
        self.lock_reason = lock_reason
        self.resource_group = resource_group

    def key(self):
        return {k: v for k, v in vars(self).items() if v is not None}

    def matches(self, rec):
        if self.disk_ids is not None and rec["DiskId"] not in self.disk_ids:
            return False
        if self.disk_name is not None and rec["DiskName"] != self.disk_name:
            return False
        if self.status is not None and self.status != DISK_STATUS:
            return False
        if self.disk_type is not None and self.disk_type != DISK_TYPE:
            return False
        if self.lock_reason is not None and self.lock_reason not in {x["LockReason"] for x in
                                                                     rec.get("OperationLocks") or ()}:
            return False
        return self.resource_group is None or (rec.get("ResourceGroupId") or "") == self.resource_group

    def postings(self, txn):
        D = cat.KIND_DISK
        if (self.status is not None and self.status != DISK_STATUS) or \
                (self.disk_type is not None and self.disk_type != DISK_TYPE):
            return None
        out = []
        if self.disk_name is not None:
            out.append(IndexPosting(txn, D, cat.F_NAME, self.disk_name.encode()))
        if self.lock_reason is not None:
            out.append(IndexPosting(txn, D, cat.F_LOCK, self.lock_reason.encode()))
        if self.resource_group is not None:
            out.append(IndexPosting(txn, D, cat.F_GROUP, self.resource_group.encode()))
        if self.disk_ids is not None:
            items = []
            for did in self.disk_ids:
                rec = txn.disk(did) if _is_disk_id(did) else None
                if rec is not None:
                    items.append((cat.disk_order(rec), did))
            out.append(ListPosting(items))
        if not out:
            out.append(IndexPosting(txn, D, cat.F_ALL, b""))
        if any(p.count() == 0 for p in out):
            return None
        return sorted(out, key=lambda p: p.count())


DISK_STATUS = "Available"  # a registered image is never attached to an instance here
DISK_TYPE = "data"         # nor is it anyone's system disk


def _is_disk_id(text):
    from .repository import DISK_ID_RE

    return isinstance(text, str) and DISK_ID_RE.match(text) is not None


def _is_snapshot_id(text):
    from .repository import SNAPSHOT_ID_RE

    return isinstance(text, str) and SNAPSHOT_ID_RE.match(text) is not None


def find_disks(repo, query, paging):
    """The page of disk records that ``query`` asks for: ``(records, TotalCount, PageNumber, PageSize,
    NextToken)``."""
    key = query.key()
    if not repo.catalog.indexed:
        recs = [r for r in repo.list_disks() if query.matches(r)]
        return page_of_list(recs, paging, key, cat.disk_order)
    with repo.catalog.read() as txn:
        postings = query.postings(txn)
        if postings is None:
            return page_of([ListPosting([])], paging, key, None)

        def read(hit):
            rec = txn.disk(hit[1])
            return rec if rec is not None and query.matches(rec) else None

        return page_of(postings, paging, key, read)
