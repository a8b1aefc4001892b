"""Which snapshots a forget policy keeps (restic's ``forget --keep-*`` rules, borg's ``prune``).

Per disk, newest first, a snapshot is kept when any rule keeps it:

    last N      the N newest snapshots;
    hourly N    the newest snapshot of each of the N newest hours that have one (likewise daily, weekly
    ... N       (ISO weeks), monthly and yearly), counted in UTC, the time the snapshots record;
    tag T       every snapshot carrying tag T (a key, or key=value).

A rule counts only the snapshots it keeps (restic's ``internal/restic/snapshot_policy.go`` does the
same): ``daily 7`` keeps one snapshot for each of the seven newest days that have any, however far apart.
Only accomplished snapshots take part; progressing and failed ones are neither kept nor removed (gc
removes failed records). This module decides; ``api.Client.forget`` deletes.
"""
import datetime

from . import errors

BUCKET_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")
RULES = ("last",) + BUCKET_RULES


def _time(rec):
    return datetime.datetime.strptime(rec["CreationTime"], "%Y-%m-%dT%H:%M:%SZ")


def _bucket(rule, t):
    if rule == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "daily":
        return (t.year, t.month, t.day)
    if rule == "weekly":
        return t.isocalendar()[:2]
    if rule == "monthly":
        return (t.year, t.month)
    return (t.year,)


def _tag_matches(rec, wanted):
    tags = (rec.get("Tags") or {}).get("Tag", []) if isinstance(rec.get("Tags"), dict) else rec.get("Tags") or []
    for tag in tags:
        key, value = tag.get("TagKey", tag.get("Key")), tag.get("TagValue", tag.get("Value", ""))
        for want in wanted:
            k, sep, v = want.partition("=")
            if key == k and (not sep or value == v):
                return True
    return False


def validate(policy, keep_tags):
    """The policy's counts as ints, checked. Raises InvalidParameter for a count that is not an int >= 0 and for
    a policy that keeps nothing (as restic refuses it: it would remove every snapshot)."""
    out = {}
    for rule in RULES:
        n = policy.get(rule, 0)
        if n is None:
            n = 0
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise errors.InvalidParameter(f"(keep-{rule}: a whole number of snapshots, 0 or more, not {n!r})")
        out[rule] = n
    unknown = set(policy) - set(RULES)
    if unknown:
        raise errors.InvalidParameter(f"(unknown forget rules: {', '.join(sorted(unknown))})")
    if isinstance(keep_tags, str) or not all(isinstance(t, str) and t for t in keep_tags):
        raise errors.InvalidParameter("(keep-tag: a list of tag keys or key=value pairs)")
    if not any(out.values()) and not keep_tags:
        raise errors.InvalidParameter("(no keep rule given: forget would remove every snapshot; give at least one "
                                      "--keep-* option)")
    return out


def plan(snapshots, policy, keep_tags=()):
    """Decide, for accomplished snapshot records, which to keep.

    Args:
        snapshots: records (DescribeSnapshots entries) of any disks; other statuses are ignored.
        policy: ``{rule: count}`` for RULES (checked by ``validate``).
        keep_tags: tags that keep every snapshot carrying them.
    Returns:
        ``(keep, remove)``: lists of ``(record, reasons)``, newest first per disk; reasons name the rules
        (``"daily"``, ``"tag"`` ...) that keep a kept snapshot.
    """
    counts = validate(policy, keep_tags)
    by_disk = {}
    for rec in snapshots:
        if rec.get("Status") == "accomplished":
            by_disk.setdefault(rec["SourceDiskId"], []).append(rec)
    keep, remove = [], []
    for disk in sorted(by_disk):
        left = dict(counts)
        last = {}
        for rec in sorted(by_disk[disk], key=lambda r: (r["CreationTime"], r.get("Seq", 0)), reverse=True):
            reasons = []
            if left["last"] > 0:
                left["last"] -= 1
                reasons.append("last")
            t = _time(rec)
            for rule in BUCKET_RULES:
                if left[rule] > 0:
                    b = _bucket(rule, t)
                    if last.get(rule) != b:
                        last[rule] = b
                        left[rule] -= 1
                        reasons.append(rule)
            if keep_tags and _tag_matches(rec, keep_tags):
                reasons.append("tag")
            (keep if reasons else remove).append((rec, reasons))
    return keep, remove
