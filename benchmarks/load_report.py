"""Load-test figures: per-level statistics from Locust output, student/teacher ratios, Markdown, plot."""

from __future__ import annotations

import numpy as np

from benchmarks.common import machine_md, md_table

# The targets for the student relative to the teacher at the same load.
TARGETS = {"p99_ratio_max": 0.25, "qps_ratio_min": 4.0, "rss_ratio_max": 0.5}
MB = 2**20


def _hist_percentiles(hist: dict, qs: tuple[float, ...]) -> list[float]:
    """Percentiles from Locust's rounded response-time histogram {ms: count}."""
    if not hist:
        return [float("nan")] * len(qs)
    values = np.array(sorted(float(k) for k in hist))
    counts = np.array([hist[k] for k in sorted(hist, key=float)], dtype=float)
    cum = np.cumsum(counts) / counts.sum()
    return [float(values[np.searchsorted(cum, q / 100)]) for q in qs]


def level_stats(entries: list[dict], latencies: np.ndarray | None = None, errors: dict | None = None) -> dict:
    """One concurrency level: request and failure counts from Locust's --json-file entries;
    percentiles from the exact per-request latencies when given (Locust rounds to whole ms)."""
    requests = sum(e["num_requests"] for e in entries)
    failures = sum(e["num_failures"] for e in entries)
    by_name = {e["name"]: {"requests": e["num_requests"], "failures": e["num_failures"]} for e in entries}
    if latencies is not None and len(latencies):
        ms = latencies[:, 1]
        window = float((latencies[:, 0] + ms / 1e3).max() - latencies[:, 0].min())
        p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
        mean, source = float(ms.mean()), "exact"
    else:
        hist: dict = {}
        for e in entries:
            for k, v in e["response_times"].items():
                hist[k] = hist.get(k, 0) + v
        p50, p95, p99 = _hist_percentiles(hist, (50, 95, 99))
        mean = sum(e["total_response_time"] for e in entries) / max(requests, 1)
        ends = [e["last_request_timestamp"] for e in entries if e["last_request_timestamp"]]
        window = (max(ends) - min(e["start_time"] for e in entries)) if ends else 0.0
        source = "locust histogram (rounded)"
    window = max(window, 1e-9)
    return {"requests": requests, "failures": failures,
            "error_rate": failures / requests if requests else 1.0,
            "qps": (requests - failures) / window, "window_s": window,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": mean, "percentile_source": source,
            "by_name": by_name, "errors": errors or {}}


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def compare(teacher: dict, student: dict) -> dict:
    """Student/teacher ratios per concurrency level and whether the issue's targets are met."""
    levels = []
    for lt, ls in zip(teacher["levels"], student["levels"], strict=True):
        r = {"users": lt["users"]}
        for key in ("p50_ms", "p95_ms", "p99_ms", "qps", "peak_rss_bytes"):
            r[key] = _ratio(ls[key], lt[key])
        errors = lt["failures"] + ls["failures"] + (lt["requests"] == 0) + (ls["requests"] == 0)
        r["targets"] = {
            f"p99 <= {TARGETS['p99_ratio_max']:g}x": r["p99_ms"] is not None and r["p99_ms"] <= TARGETS["p99_ratio_max"],
            f"QPS >= {TARGETS['qps_ratio_min']:g}x": r["qps"] is not None and r["qps"] >= TARGETS["qps_ratio_min"],
            f"peak RSS <= {TARGETS['rss_ratio_max']:g}x": (r["peak_rss_bytes"] is not None
                                                          and r["peak_rss_bytes"] <= TARGETS["rss_ratio_max"]),
            "zero errors": errors == 0,
        }
        levels.append(r)
    pt, ps = teacher["profile"], student["profile"]
    return {
        "levels": levels,
        "errors_total": sum(lv["failures"] + (lv["requests"] == 0) for s in (teacher, student) for lv in s["levels"]),
        "parameters": _ratio(student["parameters"], teacher["parameters"]),
        "model_bytes": _ratio(student["model_bytes"], teacher["model_bytes"]),
        "model_ms_p50": _ratio(ps["model_ms_p50"], pt["model_ms_p50"]),
        "engine_ms_p50": _ratio(ps["engine_ms_p50"], pt["engine_ms_p50"]),
        "serial_http_ms_p50": _ratio(student["serial_http"]["ms_p50"], teacher["serial_http"]["ms_p50"]),
        "idle_rss_bytes": _ratio(student["idle_rss_bytes"], teacher["idle_rss_bytes"]),
        "model_load_rss_bytes": _ratio(ps["model_load_rss_bytes"], pt["model_load_rss_bytes"]),
    }


def _x(v) -> str:
    return "–" if v is None else f"{v:.3g}x"


def reproduce_command(cfg: dict, teacher: str, student: str) -> str:
    """The command line that reruns this load test: every setting that differs from the defaults."""
    parts = [f"python -m benchmarks.load_test --teacher {teacher} --student {student}",
             f"--users {','.join(map(str, cfg['users']))} --duration {cfg['duration_s']:g}s"]
    parts += [f"--{role}-model-file {cfg[f'{role}_model_file']}" for role in ("teacher", "student")
              if cfg.get(f"{role}_model_file")]
    parts += [f"--env {k}={v}" for k, v in sorted((cfg.get("env") or {}).items())]
    return " ".join(parts + ["--out DIR"])


def report_md(payload: dict) -> str:
    cfg, services, comp = payload["config"], payload["services"], payload["comparison"]
    t, s = services["teacher"], services["student"]
    lines = [
        "# Load test: teacher vs student under the same Locust load", "",
        f"Machine: {machine_md(payload['machine'])}; load average at the end {payload['load_average_1m_end']}. "
        "Load generator and servers share the machine, so compare ratios, not absolute times.", "",
        f"Settings: `{cfg['service']}` on {cfg['host']}, ONNX Runtime {cfg['ort_threads']} intra-op thread(s), "
        f"Faiss {cfg['faiss_threads']} thread(s), server environment "
        f"`{' '.join(f'{k}={v}' for k, v in sorted(payload.get('server_env', {}).items()))}`; Locust FastHttpUser without "
        f"think time, {cfg['duration_s']:g} s per level, spawn rate {cfg['spawn_rate'] or 'all at once'}; "
        f"requests POST /recommend k={cfg['k']}, known users : explicit test-split histories = "
        f"{cfg['user_weight']}:{cfg['history_weight']} (payloads `{payload['payloads']}`).", "",
        "## Student / teacher", "",
        md_table(["users", "p50", "p95", "p99", "QPS", "peak RSS", "targets met"],
                 [[r["users"], _x(r["p50_ms"]), _x(r["p95_ms"]), _x(r["p99_ms"]), _x(r["qps"]),
                   _x(r["peak_rss_bytes"]), ", ".join(k for k, ok in r["targets"].items() if ok) or "none"]
                  for r in comp["levels"]]), "",
        f"Parameters {_x(comp['parameters'])}, model file {_x(comp['model_bytes'])}, model-only latency "
        f"{_x(comp['model_ms_p50'])}, serial HTTP latency {_x(comp['serial_http_ms_p50'])}, idle server RSS "
        f"{_x(comp['idle_rss_bytes'])}, RSS added by loading the artifact {_x(comp['model_load_rss_bytes'])}. "
        f"Failed requests in all: {comp['errors_total']}. Targets: student p99 <= 1/4, QPS >= 4x, "
        "peak RSS <= 1/2 of the teacher's, zero errors.", "",
        "## Per service and concurrency", "",
        md_table(["model", "users", "requests", "failures", "QPS", "p50 ms", "p95 ms", "p99 ms", "mean ms",
                  "peak RSS MB"],
                 [[role, lv["users"], lv["requests"], lv["failures"], lv["qps"], lv["p50_ms"], lv["p95_ms"],
                   lv["p99_ms"], lv["mean_ms"], lv["peak_rss_bytes"] / MB]
                  for role, svc in services.items() for lv in svc["levels"]]), "",
        "## Models", "",
        md_table(["model", "kind", "architecture", "layers", "hidden", "parameters", "served file", "model file MB",
                  "item embeddings MB", "items", "server ready s", "idle RSS MB"],
                 [[role, svc["kind"], svc["architecture"], svc["num_layers"], svc["hidden_size"],
                   svc["parameters"], svc.get("model_file", "?"), svc["model_bytes"] / MB, (svc["embeddings_bytes"] or 0) / MB,
                   svc["num_items"], svc["ready_s"], svc["idle_rss_bytes"] / MB]
                  for role, svc in services.items()]), "",
        "## Where the time goes (batch 1, one request at a time, p50 ms)", "",
        "Model = ONNX Runtime session run, retrieval = Faiss search with seen-item exclusion and exact "
        "re-scoring, both timed in-process with the serving engine; engine = the whole `recommend()` "
        "(also history lookup and response building); HTTP = one client's serial requests to the "
        "running server; the difference is HTTP, validation and BentoML.", "",
        md_table(["model", "model (ORT)", "retrieval (Faiss)", "engine total", "HTTP end-to-end",
                  "HTTP + framework", "model share of HTTP"],
                 [[role, p["model_ms_p50"], p["retrieval_ms_p50"], p["engine_ms_p50"], h["ms_p50"],
                   h["ms_p50"] - p["engine_ms_p50"], f"{p['model_ms_p50'] / h['ms_p50']:.0%}"]
                  for role, svc in services.items() for p, h in [(svc["profile"], svc["serial_http"])]]), "",
        "![latency vs concurrency](load_test.png)", "",
        f"Reproduce: `{reproduce_command(cfg, t['artifact'], s['artifact'])}`", "",
    ]
    errors = {f"{role} u={lv['users']}": lv["errors"] for role, svc in services.items() for lv in svc["levels"]
              if lv["errors"]}
    if errors:
        lines += ["## Failures", ""] + [f"- {where}: {msg} ({n}x)" for where, errs in errors.items()
                                         for msg, n in errs.items()] + [""]
    return "\n".join(lines)


def plot_levels(services: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"teacher": "tab:red", "student": "tab:green"}
    for role, svc in services.items():
        users = [lv["users"] for lv in svc["levels"]]
        c = colors.get(role, "gray")
        axes[0].plot(users, [lv["p50_ms"] for lv in svc["levels"]], "o-", color=c, label=f"{role} p50")
        axes[0].plot(users, [lv["p99_ms"] for lv in svc["levels"]], "s--", color=c, label=f"{role} p99")
        axes[1].plot(users, [lv["qps"] for lv in svc["levels"]], "o-", color=c, label=role)
        axes[2].plot(users, [lv["peak_rss_bytes"] / MB for lv in svc["levels"]], "o-", color=c, label=role)
    levels = sorted({lv["users"] for svc in services.values() for lv in svc["levels"]})
    axes[0].set_yscale("log")
    for ax, title, ylabel in zip(axes, ("latency", "throughput", "server memory"),
                                 ("ms", "successful requests / s", "peak RSS of the process tree (MB)"),
                                 strict=True):
        ax.set(xscale="log", title=title, xlabel="concurrent users (Locust)", ylabel=ylabel)
        ax.set_xticks(levels, [str(u) for u in levels])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
