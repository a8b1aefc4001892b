"""qcow2 against raw, and blocksnap against qemu-img, on the 2 GiB workload image, in one run.

Prepared untimed: the workload image (bench/workload.py), ``qemu-img convert -O qcow2`` of it (plain),
``qemu-img convert -c -O qcow2 -o compression_type=zstd`` of it (zstd). Then, for each of --repeat rounds
after one untimed round (the first process that writes much new page cache after a large free pays for
faulting memory back from the host), the steps interleaved, each one child process, in this order in odd
rounds and with each group's order reversed in even ones:

    snapshot raw          blocksnap snapshot create of the raw image (a fresh repository: a full snapshot)
    snapshot qcow2        the same of the plain qcow2
    snapshot qcow2-zstd   the same of the zstd qcow2
    qemu-img zstd->raw    qemu-img convert -O raw of the zstd qcow2 (decompress and write, the reference
                          for reading a compressed qcow2)
    restore qcow2         blocksnap restore --format qcow2 of the raw image's snapshot
    qemu-img raw->qcow2   qemu-img convert -O qcow2 of the raw image (the reference for writing qcow2)
    restore qcow2 zstd    blocksnap restore --format qcow2 --compress
    qemu-img raw->zstd    qemu-img convert -c -O qcow2 -o compression_type=zstd of the raw image

Every output is checked (restores compared with ``qemu-img compare``, snapshots restored once and
compared). Targets (issue 8): snapshot qcow2 <= 1.25x snapshot raw; snapshot qcow2-zstd <= 1.25x the
snapshot of its raw conversion (the raw image: qemu-img zstd->raw of it is byte-identical, checked with cmp;
the conversion's own time is reported beside it); restore qcow2 <= 1.5x qemu-img raw->qcow2 (the core's
bound for raw restores against qemu-img: a restore checks every chunk's hash, qemu-img checks nothing).

    python3 bench/qcow2.py [--size 2G] [--repeat 3] [--workdir DIR] [--keep]

Writes bench/out/qcow2-<timestamp>.md and .json.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import peers  # noqa: E402
import workload  # noqa: E402

STEPS = ("snapshot raw", "snapshot qcow2", "snapshot qcow2-zstd", "qemu-img zstd->raw", "restore qcow2",
         "qemu-img raw->qcow2", "restore qcow2 zstd", "qemu-img raw->zstd")
# The raw image is byte-identical to qemu-img's conversion of the zstd qcow2 to raw (checked: cmp), so
# "snapshot raw" is also the time of snapshotting that conversion.
TARGETS = (("snapshot qcow2", "snapshot raw", 1.25), ("snapshot qcow2-zstd", "snapshot raw", 1.25),
           ("restore qcow2", "qemu-img raw->qcow2", 1.5))


def _json(out, key):
    value = peers.parse_json_field(out, key)
    if not value:
        raise peers.StepFailed("blocksnap", key, f"printed no {key}", out)
    return value


def run(args):
    workdir = args.workdir or tempfile.mkdtemp(prefix="bs-qcow2-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    os.makedirs(workdir, exist_ok=True)
    bench = peers.Bench(workdir)
    bs, bs_how = peers.blocksnap_command(args.blocksnap)
    size = workload.parse_size(args.size)
    raw = os.path.join(workdir, "disk.img")
    plain = os.path.join(workdir, "disk.qcow2")
    zstd = os.path.join(workdir, "disk-zstd.qcow2")
    bench.log(f"preparing {args.size} workload image and its qcow2 copies in {workdir}")
    workload.make_image(raw, size, seed=0)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, plain], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, zstd], check=True)
    counter = [0]

    def fresh(image):
        counter[0] += 1
        repo = os.path.join(workdir, f"repo-{counter[0]}")
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run(bs + ["--repo", repo, "init"], check=True, capture_output=True)
        p = subprocess.run(bs + ["--repo", repo, "disk", "add", image, "--json"], check=True, capture_output=True,
                           text=True)
        return repo, _json(p.stdout, "DiskId")

    def rm(*paths):
        for p in paths:
            if os.path.lexists(p):
                os.unlink(p)

    times = {s: [] for s in STEPS}
    rss = {s: [] for s in STEPS}
    checked = []
    for rnd in range(args.repeat + 1):
        timed = rnd > 0
        bench.repeat = rnd
        tag = "" if timed else " (untimed)"
        snaps = {}
        # The order alternates from round to round (ABBA): the step that runs right after another one
        # freed or filled memory does not always belong to the same tool.
        flip = rnd % 2 == 0
        snap_steps = [("snapshot raw", raw), ("snapshot qcow2", plain), ("snapshot qcow2-zstd", zstd)]
        for step, image in (snap_steps[::-1] if flip else snap_steps):
            repo, disk = fresh(image)
            rec = bench.run("blocksnap", step + tag, bs + ["--repo", repo, "snapshot", "create", disk, "--json"],
                            warm=[image], timed=True)
            snaps[step] = (repo, _json(rec["stdout"], "SnapshotId"))
            if timed:
                times[step].append(rec["wall_s"])
                rss[step].append(rec["maxrss_kib"] / 1024)
        out_raw = os.path.join(workdir, "out.raw")
        rm(out_raw)
        rec = bench.run("qemu-img", "qemu-img zstd->raw" + tag, ["qemu-img", "convert", "-O", "raw", zstd, out_raw],
                        warm=[zstd])
        if timed:
            times["qemu-img zstd->raw"].append(rec["wall_s"])
            rss["qemu-img zstd->raw"].append(rec["maxrss_kib"] / 1024)
        repo, sid = snaps["snapshot raw"]
        outs = []
        for step, extra, ref_argv in (
                ("restore qcow2", [], ["qemu-img raw->qcow2", ["qemu-img", "convert", "-O", "qcow2"]]),
                ("restore qcow2 zstd", ["--compress"],
                 ["qemu-img raw->zstd", ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd"]])):
            out = os.path.join(workdir, f"out-{len(outs)}.qcow2")
            ref_out = os.path.join(workdir, f"ref-{len(outs)}.qcow2")
            rm(out, ref_out)
            ours = lambda: bench.run("blocksnap", step + tag, bs + ["--repo", repo, "restore", sid, out, "--format",  # noqa: E731
                                                                    "qcow2"] + extra, warm=[repo])
            theirs = lambda: bench.run("qemu-img", ref_argv[0] + tag, ref_argv[1] + [raw, ref_out], warm=[raw])  # noqa: E731
            if flip:
                rec2, rec = theirs(), ours()
            else:
                rec, rec2 = ours(), theirs()
            if timed:
                times[step].append(rec["wall_s"])
                rss[step].append(rec["maxrss_kib"] / 1024)
                times[ref_argv[0]].append(rec2["wall_s"])
                rss[ref_argv[0]].append(rec2["maxrss_kib"] / 1024)
            outs.append((step, out, ref_out))
        if rnd == 0:
            # Every output checked once: restores against the image, snapshots of each format restored.
            subprocess.run(["cmp", out_raw, raw], check=True)
            for step, out, ref_out in outs:
                subprocess.run(["qemu-img", "check", "-q", out], check=True)
                subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", out, raw], check=True)
                checked.append(f"{step}: qemu-img check clean, compare identical; {os.path.getsize(out) >> 20} MiB "
                               f"(qemu-img's {os.path.getsize(ref_out) >> 20} MiB)")
            for step, (repo_s, sid_s) in snaps.items():
                back = os.path.join(workdir, "back.raw")
                rm(back)
                subprocess.run(bs + ["--repo", repo_s, "restore", sid_s, back], check=True, capture_output=True)
                subprocess.run(["cmp", back, raw], check=True)
                checked.append(f"{step}: its snapshot restores byte-identical to the raw image")
                rm(back)
        for step, (repo_s, _) in snaps.items():
            if repo_s != repo:
                shutil.rmtree(repo_s, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
    med = {s: statistics.median(v) for s, v in times.items() if v}
    report = {"Size": size, "Repeat": args.repeat, "Blocksnap": bs_how, "Medians": med, "Times": times,
              "PeakRssMiB": {s: max(v) for s, v in rss.items() if v}, "Checked": checked, "Targets": []}
    lines = [f"# qcow2 benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"{args.size} workload image, {args.repeat} timed rounds after one untimed, steps interleaved; "
             f"blocksnap: {bs_how}", "", "| step | median s | runs | peak RSS MiB |", "|---|---|---|---|"]
    for s in STEPS:
        lines.append(f"| {s} | {med[s]:.2f} | {', '.join(f'{t:.2f}' for t in times[s])} | "
                     f"{report['PeakRssMiB'][s]:.0f} |")
    lines += ["", "| target | ratio | met |", "|---|---|---|"]
    for a, b, limit in TARGETS:
        ratio = med[a] / med[b]
        report["Targets"].append({"Step": a, "Against": b, "Limit": limit, "Ratio": ratio, "Met": ratio <= limit})
        lines.append(f"| {a} <= {limit}x {b} | {ratio:.2f} | {'yes' if ratio <= limit else 'NO'} |")
    lines.append(f"| (snapshot qcow2-zstd vs qemu-img zstd->raw alone) | "
                 f"{med['snapshot qcow2-zstd'] / med['qemu-img zstd->raw']:.2f} | |")
    lines.append(f"| (restore qcow2 zstd vs qemu-img raw->zstd) | {med['restore qcow2 zstd'] / med['qemu-img raw->zstd']:.2f} | |")
    lines += ["", "Checked:"] + [f"- {c}" for c in checked]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(BENCH_DIR, "out"), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(BENCH_DIR, "out", f"qcow2-{stamp}")
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print(text)
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--blocksnap", help="command that runs blocksnap (default: the installed one)")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
