#!/usr/bin/env python3
"""Figures of scripts/bench.

  summarize.py pgbench OUTPUT LOG_PREFIX   pgbench's summary and per-transaction logs
                                           as one JSON line (tps, latency percentiles)
  summarize.py half-rate SEND_JSON         half the accepted/s of a `send` report
  summarize.py cpu-snapshot [NAME=PID...] [db_commits=N]
                                           CPU ticks used so far: the machine's, and
                                           those of every PostgreSQL process, of
                                           RabbitMQ and of each named process, as one
                                           JSON line with the given commit count
  summarize.py cpu-use BEFORE AFTER [TIME] CPU use between two snapshots in percent of
                                           one core. TIME contains the user and system
                                           seconds bash's `time` gave the loadgen
  summarize.py table RUN_DIR               the results table (Markdown) of a run, each
                                           figure with its target, baseline, ratio and
                                           PASS/MISS, and the CPU use of each step

The table reads the JSON reports scripts/bench leaves in RUN_DIR; a missing report
shows as "not measured". Nothing here fails on a target.
"""

import glob
import json
import math
import os
import re
import sys


def percentile(sorted_values, percent):
    """Nearest rank, as reach-loadgen computes it."""
    if not sorted_values:
        return None
    rank = math.ceil(percent / 100 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def pgbench(output_path, log_prefix):
    text = open(output_path, encoding="utf-8").read()

    def number(pattern):
        match = re.search(pattern, text)
        return float(match.group(1)) if match else None

    # Per-transaction logs: client, transaction, latency in microseconds, ...
    latencies = []
    for path in glob.glob(log_prefix + ".*"):
        with open(path, encoding="utf-8") as log:
            for line in log:
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]) / 1000)
    latencies.sort()
    tps = number(r"tps = ([0-9.]+) \(without initial connection time\)")
    report = {
        "tps": round(tps, 1) if tps is not None else None,
        "transactions": int(number(r"number of transactions actually processed: (\d+)") or 0),
        "failed": int(number(r"number of failed transactions: (\d+)") or 0),
        "latency_avg_ms": number(r"latency average = ([0-9.]+) ms"),
        "latency_ms": {
            "count": len(latencies),
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else None,
        },
    }
    print(json.dumps(report))


def cpu_snapshot(pairs):
    named = {}
    commits = None
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name == "db_commits":
            commits = int(value) if value.isdigit() else None
        elif value:
            named[value] = name
    with open("/proc/stat", encoding="utf-8") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                line = stat.read()
        except OSError:
            continue
        comm = line[line.index("(") + 1:line.rindex(")")]
        rest = line[line.rindex(")") + 2:].split()
        ticks = int(rest[11]) + int(rest[12])
        if entry in named:
            group = named[entry]
        elif comm == "postgres":
            group = "postgres"
        elif comm == "beam.smp":
            group = "rabbitmq"
        else:
            continue
        processes[entry] = [group, ticks]
    print(json.dumps({"busy": busy, "all": sum(fields[:8]), "processes": processes, "db_commits": commits}))


def cpu_use(before_text, after_text, time_path=None):
    before, after = json.loads(before_text), json.loads(after_text)
    hz = os.sysconf("SC_CLK_TCK")
    cpus = os.cpu_count() or 1
    wall_ticks = (after["all"] - before["all"]) / cpus
    if wall_ticks <= 0:
        print("{}")
        return

    percent = lambda ticks: round(100 * ticks / wall_ticks)
    use = {"wall_seconds": round(wall_ticks / hz, 1), "machine": percent(after["busy"] - before["busy"])}
    # Per process: a process that started in between counts from zero, one that
    # exited in between is missing from both sums.
    groups = {}
    for pid, (group, ticks) in after["processes"].items():
        earlier = before["processes"].get(pid)
        delta = ticks - earlier[1] if earlier and earlier[0] == group else ticks
        groups[group] = groups.get(group, 0) + delta

    known = 0
    for group, delta in groups.items():
        use[group] = percent(delta)
        known += delta

    if time_path:
        try:
            user, system = (float(v) for v in open(time_path, encoding="utf-8").read().split()[-2:])
            loadgen = (user + system) * hz
            use["loadgen"] = percent(loadgen)
            known += loadgen
        except (OSError, ValueError):
            pass
    use["other"] = max(0, percent(after["busy"] - before["busy"] - known))
    if before.get("db_commits") is not None and after.get("db_commits") is not None:
        use["db_commits_per_second"] = round((after["db_commits"] - before["db_commits"]) / (wall_ticks / hz))
    print(json.dumps(use))


def load(run_dir, name):
    path = os.path.join(run_dir, name + ".json")
    try:
        with open(path, encoding="utf-8") as report:
            return json.loads(report.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def fmt(value, unit=""):
    if value is None:
        return "–"
    if isinstance(value, float) and value >= 100:
        value = round(value)
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value:,.1f}{unit}"


class Table:
    def __init__(self, title):
        self.title = title
        self.rows = []

    def row(self, figure, value, unit="", target=None, baseline=None, baseline_label="", note="", on_ratio=False):
        """target: (comparison, limit), comparison one of >=, <=, <; with on_ratio the
        limit applies to value / baseline instead of value."""
        ratio = value / baseline if value is not None and baseline else None
        target_text = verdict = ""
        if target is not None:
            comparison, limit = target
            checked = ratio if on_ratio else value
            target_text = f"ratio {comparison} {limit}" if on_ratio else f"{comparison} {fmt(limit, unit)}"
            if checked is None:
                verdict = "MISS (not measured)"
            else:
                met = {">=": checked >= limit, "<=": checked <= limit, "<": checked < limit}[comparison]
                verdict = "PASS" if met else "MISS"
        self.rows.append([
            figure,
            target_text,
            fmt(value, unit),
            f"{fmt(baseline, unit)} {baseline_label}".strip() if baseline is not None else "",
            f"{ratio:.2f}" if ratio is not None else "",
            verdict,
            note,
        ])

    def print(self):
        print(f"### {self.title}")
        print()
        print("| figure | target | measured | baseline | ratio | verdict | notes |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")
        print()


def table(run_dir):
    pg = load(run_dir, "pgbench")
    full = load(run_dir, "ingress")
    half = load(run_dir, "ingress_half")
    one = load(run_dir, "e2e_one")
    ten = load(run_dir, "e2e_ten")
    maximum = load(run_dir, "e2e_max")
    get = lambda report, *keys: _get(report, keys)

    section = Table("1. Ingress throughput, 64 concurrent senders, inbound texts")
    pg_note = f"pgbench {get(pg, 'transactions')} transactions, {get(pg, 'failed')} failed" if pg else ""
    section.row("accepted/s", get(full, "accepted_per_second"), "/s", (">=", 1.0), get(pg, "tps"), "tps (pgbench)",
              f"{get(full, 'accepted')} accepted, {get(full, 'rejected')} rejected; {pg_note}", on_ratio=True)
    section.row("response p50", get(full, "latency_ms", "p50"), " ms", None, get(pg, "latency_ms", "p50"), "(pgbench)")
    section.row("response p99", get(full, "latency_ms", "p99"), " ms", None, get(pg, "latency_ms", "p99"), "(pgbench)")
    section.row("response average (pgbench: latency average)", None, " ms", None, get(pg, "latency_avg_ms"), "(pgbench)",
              "the loadgen reports percentiles only")
    section.row(f"response p99 at half rate ({fmt(get(half, 'target_rate'), '/s')})", get(half, "latency_ms", "p99"), " ms",
              ("<", 50.0), None, "", f"p50 {fmt(get(half, 'latency_ms', 'p50'), ' ms')}, {fmt(get(half, 'accepted_per_second'), '/s')} accepted")
    section.print()

    section = Table("2. End to end: Meta POST to callback received")
    for label, report, target in (
        ("(a) 500 webhooks/s, 1 endpoint", one, ("<=", 20.0)),
        ("(b) 250 webhooks/s × 10 endpoints", ten, ("<=", 50.0)),
    ):
        counts = e2e_counts(report)
        section.row(f"{label}: p50", get(report, "latency_ms", "p50"), " ms", None, None, "", counts)
        section.row(f"{label}: p99", get(report, "latency_ms", "p99"), " ms", target, None, "",
                    f"{fmt(get(report, 'delivered_per_second_while_sending'), '/s')} callbacks while sending")
    section.row("(c) maximum: callbacks/s, first POST to last callback", get(maximum, "delivered_per_second"), "/s", (">=", 5000.0), None, "",
              f"{fmt(get(maximum, 'accepted_per_second'), '/s')} accepted; "
              f"{fmt(get(maximum, 'delivered_per_second_while_sending'), '/s')} callbacks while sending; "
              f"backlog at send end {get(maximum, 'backlog_at_send_end')}, "
              + (f"drained {fmt(get(maximum, 'drain_seconds'), ' s')} later" if get(maximum, "drained") else "NOT drained")
              + f"; {e2e_counts(maximum)}")
    section.row("(c) maximum: accepted/s", get(maximum, "accepted_per_second"), "/s", None, None, "",
              f"response p50 {fmt(get(maximum, 'ingress_latency_ms', 'p50'), ' ms')}, p99 {fmt(get(maximum, 'ingress_latency_ms', 'p99'), ' ms')}; "
              f"end to end p50 {fmt(get(maximum, 'latency_ms', 'p50'), ' ms')}, p99 {fmt(get(maximum, 'latency_ms', 'p99'), ' ms')}")
    section.print()

    section = Table("3. Relay drain of a queued backlog")
    for label, name, target in (("1 endpoint", "drain_one", 4500.0), ("10 endpoints", "drain_ten", 7000.0)):
        report = load(run_dir, name)
        note = ""
        if report:
            relay_start = read_number(os.path.join(run_dir, name + ".relay_start_ms"))
            last = report.get("last_arrival_unix_ms")
            if relay_start and last and last > relay_start:
                report["from_relay_start_per_second"] = report["delivered"] / ((last - relay_start) / 1000)
            note = (f"{report['delivered']} of {report['expected']} in {report['seconds']} s"
                    f"{'' if report['complete'] else ' (INCOMPLETE)'}, {report['duplicates']} duplicates, "
                    f"{report['signature_failures']} bad signatures; "
                    f"{fmt(report.get('from_relay_start_per_second'), '/s')} from the relay's start")
        section.row(f"deliveries/s, {label}", get(report, "delivered_per_second"), "/s", (">=", target), None, "", note)
    section.print()
    cpu_table(run_dir)
    counters_table(run_dir)


def cpu_table(run_dir):
    steps = (("pgbench baseline", "pgbench"), ("ingress, 64 senders", "ingress"), ("ingress, half rate", "ingress_half"),
             ("end to end (a)", "e2e_one"), ("end to end (b)", "e2e_ten"), ("end to end (c)", "e2e_max"),
             ("drain, 1 endpoint", "drain_one"), ("drain, 10 endpoints", "drain_ten"))
    columns = ("machine", "ingress", "relay", "postgres", "rabbitmq", "loadgen", "other")
    print("### CPU use per step, percent of one core (the machine has %d)" % (os.cpu_count() or 1))
    print()
    print("| step | seconds | " + " | ".join(columns) + " | database commits/s |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |")
    for label, name in steps:
        use = load(run_dir, name + ".cpu")
        if not use:
            continue
        cells = [str(use[c]) if c in use else "" for c in columns]
        commits = fmt(use.get("db_commits_per_second"))
        print(f"| {label} | {use.get('wall_seconds', '')} | " + " | ".join(cells) + f" | {commits} |")
    print()
    print("`other` is everything else on the machine: the pgbench client and the drain's subscriber, "
          "and any process outside the benchmark. The end-to-end steps include their warm-up.")
    print()


def read_metrics(path):
    """Prometheus text: {(name, labels): value}, labels as the raw `{...}` text."""
    metrics = {}
    try:
        with open(path, encoding="utf-8") as text:
            for line in text:
                if not line.strip() or line.startswith("#"):
                    continue
                match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
                if match:
                    metrics[(match.group(1), match.group(2) or "")] = float(match.group(3))
    except OSError:
        return None
    return metrics


def metric_total(metrics, name, label=""):
    return sum(v for (n, labels), v in metrics.items() if n == name and label in labels)


def metric_mean(metrics, name):
    count = metric_total(metrics, name + "_count")
    return metric_total(metrics, name + "_sum") / count if count else None


def counters_table(run_dir):
    steps = (("ingress, 64 senders and half rate", "ingress"), ("end to end (a)", "e2e_one"), ("end to end (b)", "e2e_ten"),
             ("end to end (c)", "e2e_max"), ("drain fill, 1 endpoint", "drain_one_fill"), ("drain, 1 endpoint", "drain_one"),
             ("drain fill, 10 endpoints", "drain_ten_fill"), ("drain, 10 endpoints", "drain_ten"))
    rows = []

    for label, step in steps:
        ingress = read_metrics(os.path.join(run_dir, f"{step}.reach-ingress.metrics"))
        relay = read_metrics(os.path.join(run_dir, f"{step}.reach-webhook-relay.metrics"))
        if ingress is None and relay is None:
            continue

        cells = [label]
        millis = lambda value: None if value is None else value * 1000
        if ingress:
            cells += [fmt(int(metric_total(ingress, "reach_ingress_commit_batch_size_count"))),
                      fmt(metric_mean(ingress, "reach_ingress_commit_batch_size")),
                      fmt(millis(metric_mean(ingress, "reach_ingress_webhook_duration_seconds")), " ms"),
                      fmt(metric_mean(ingress, "reach_outbox_publish_batch_size")),
                      fmt(millis(metric_mean(ingress, "reach_outbox_publish_duration_seconds")), " ms")]
        else:
            cells += ["", "", "", "", ""]

        if relay:
            outcomes = []
            for (name, labels), value in sorted(relay.items()):
                match = re.search(r'outcome="([^"]*)"', labels)
                if name == "reach_relay_deliveries_total" and match:
                    outcomes.append(f"{match.group(1)} {int(value)}")
            cells += [", ".join(outcomes) or "none",
                      fmt(int(metric_total(relay, "reach_relay_retries_claimed_total"))),
                      fmt(metric_mean(relay, "reach_relay_record_batch_size")),
                      fmt(millis(metric_mean(relay, "reach_relay_delivery_latency_seconds")), " ms")]
        else:
            cells += ["", "", "", ""]
        rows.append(cells)

    if not rows:
        return
    print("### Service counters per step (from each service's /metrics before it stopped, warm-up included)")
    print()
    print("Means from the services' histograms: `ingress mean` is a POST from its start to the response, "
          "`publish mean` one outbox publish transaction (claim, publish, confirms, mark dispatched), "
          "`event to delivery mean` the relay's time from the event's creation at the ingress to its delivered callback.")
    print()
    print("| step | ingress commits | webhooks per commit | ingress mean | rows per publish | publish mean "
          "| relay deliveries by outcome | retries claimed | records per relay commit | event to delivery mean |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print()


def read_number(path):
    try:
        return int(open(path, encoding="utf-8").read().strip())
    except (OSError, ValueError):
        return None


def e2e_counts(report):
    if not report:
        return ""
    return (f"{report['accepted']} accepted, {report['delivered']} of {report['expected']} callbacks, "
            f"{report['lost']} lost, {report['duplicates']} duplicates")


def _get(report, keys):
    value = report
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def half_rate(path):
    report = json.loads(open(path, encoding="utf-8").read().strip().splitlines()[-1])
    print(max(1, round(report["accepted_per_second"] / 2)))


def main(argv):
    if len(argv) == 4 and argv[1] == "pgbench":
        pgbench(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "half-rate":
        half_rate(argv[2])
    elif len(argv) >= 2 and argv[1] == "cpu-snapshot":
        cpu_snapshot(argv[2:])
    elif len(argv) in (4, 5) and argv[1] == "cpu-use":
        cpu_use(*argv[2:])
    elif len(argv) == 3 and argv[1] == "table":
        table(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
