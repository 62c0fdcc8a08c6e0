"""Length robustness (issue 15): is an injection caught wherever it sits in a text, at what cost?

Two parts, one run, on the registered demo model (version 1, trained length-robust by
bench/demo_model.py):

- accuracy by length, in this process, through the service's own runner
  (`runners.text.TextClassificationRunner` on the registered artifact) for each
  `REGISTRY_LONG_TEXT` mode (`windows`, `truncate`, `head_tail`): recall on held-out injections
  placed after 0, 1, 2, 5 and 20 benign sentences, past 512 tokens of benign text, and first before
  about 3,000 characters of it; false-positive rate on held-out benign texts (hard negatives among
  them) laid out the same way. Held out means made of pieces the model never saw in training
  (training/data/compose.py splits injections, benign texts and context sentences before composing).
- throughput through the real service (`bentoml serve`, as the hot path runs it), one text per
  request at 32 clients, `REGISTRY_LONG_TEXT=windows` against `truncate`: short-only traffic
  (the hot path's text mix, each text within one window: both modes do the same work, so the ratio
  is the cost of the windows code path alone) and mixed-length traffic (the same mix plus one long
  held-out text in five: windows mode reads all of each long text, truncate only its first window).
  The traffic kinds and modes are interleaved, round by round.
- long texts at the model's own speed: the mixed-length traffic in characters/s, the windows
  service beside the raw model (the artifact with plain transformers, bench/hotpath.py's RawModel)
  running the very windows the service reads (cut by the service's reading, as `/models` names it),
  in length-sorted batches of 8-32 at 1 and 2 torch threads and on 2 lanes of one thread, best of
  all: what fraction of the machine's window throughput the service turns into whole-text answers.
  Measured after the services stop, so that nothing else runs beside it.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from bench.demo_model import text_mix
from bench.lab import Lab, get_json
from bench.load import LoadResult, run_load
from bench.report import AreaReport

MODES = ("windows", "truncate", "head_tail")
CLIENTS = 32
LONG_SHARE = 0.2  # of the mixed traffic's requests
#: The windows service on one forward lane of two torch threads (REGISTRY_FORWARD_THREADS=1, REGISTRY_TORCH_THREADS=2).
WIDE = "windows-1-lane-2-threads"
#: The raw model over the mixed traffic's windows: (torch threads, batch, lanes), length-sorted batches.
RAW_WINDOW_CONFIGS = [(t, b, 1) for t in (1, 2) for b in (8, 16, 32)] + [(1, b, 2) for b in (8, 16, 32)]


def accuracy_by_length(lab: Lab, per_bucket: Optional[int]) -> dict[str, Any]:
    """{mode: {"recall": {bucket: r}, "fpr": {bucket: f}, "seconds", "windows_read"}, "rows": counts} through the runner."""
    from runners.text import TextClassificationRunner
    from training.data import compose

    demo = lab.demo()
    _, test = compose.split_pieces()
    rows = compose.length_rows(test, per_bucket=per_bucket)
    texts = [r["text"] for r in rows]
    gate = compose.read_jsonl(compose.GATE_PATH)
    out: dict[str, Any] = {"rows": {b: {lab_: sum(r["bucket"] == b and r["label"] == lab_ for r in rows)
                                        for lab_ in ("INJECTION", "SAFE")} for b in compose.BUCKETS}}
    for mode in MODES:
        runner = TextClassificationRunner(demo.records["1"], demo.settings(long_text=mode))
        runner.load()
        try:
            started = time.perf_counter()
            predictions: list[dict[str, Any]] = []
            for k in range(0, len(texts), 64):
                predictions += runner.predict(texts[k:k + 64])
            seconds = time.perf_counter() - started
            window = runner.reading.window if runner.reading else None
            gate_answers = runner.predict([r["text"] for r in gate])
        finally:
            runner.close()
        flagged = [p["label"] == "INJECTION" for p in predictions]
        recall, fpr = {}, {}
        for b in compose.BUCKETS:
            pos = [f for r, f in zip(rows, flagged) if r["bucket"] == b and r["label"] == "INJECTION"]
            neg = [f for r, f in zip(rows, flagged) if r["bucket"] == b and r["label"] == "SAFE"]
            recall[b] = sum(pos) / len(pos) if pos else None
            fpr[b] = sum(neg) / len(neg) if neg else None
        gate_accuracy = sum(a["label"] == r["label"] for a, r in zip(gate_answers, gate)) / len(gate)
        out[mode] = {"recall": recall, "fpr": fpr, "seconds": round(seconds, 2), "window": window, "gate_accuracy": gate_accuracy,
                     "windows_read": sum(int(p.get("windows", 1)) for p in predictions), "texts": len(texts)}
    return out


def traffic(lab: Lab, window: int) -> tuple[list[str], list[str], dict[str, Any]]:
    """(short-only texts, mixed-length texts, what they are): short ones fit one window of the served model."""
    from transformers import AutoTokenizer

    from bench.peers import artifact_dirs
    from training.data import compose

    _, tokenizer_dir = artifact_dirs(lab)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    capacity = window - tokenizer.num_special_tokens_to_add(pair=False)

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    mix = text_mix()
    short = [t for t in mix if tokens(t) <= capacity]
    _, test = compose.split_pieces()
    longs = [r["text"] for r in compose.length_rows(test, seed=compose.SEED + 7, per_bucket=6,
                                                   buckets=("20", compose.PAST_512, compose.START_LONG))]
    longs = [t for t in longs if tokens(t) > capacity]
    n_long = round(len(short) * LONG_SHARE / (1 - LONG_SHARE))
    rng = random.Random(11)
    mixed = short + rng.sample(longs, min(n_long, len(longs)))
    rng.shuffle(mixed)
    lengths = [tokens(t) for t in mixed]
    info = {"short_texts": len(short), "short_dropped_longer_than_a_window": len(mix) - len(short),
            "mixed_texts": len(mixed), "mixed_long_texts": len(mixed) - len(short),
            "mixed_tokens_max": max(lengths), "mixed_tokens_mean": round(sum(lengths) / len(lengths), 1), "window": window,
            "short_chars_mean": round(sum(map(len, short)) / len(short), 1)}
    return short, mixed, info


def raw_windows(lab: Lab, texts: list[str], reading: dict[str, Any], seconds: float, trials: int) -> dict[str, Any]:
    """texts/s and characters/s of the raw model over the windows `reading` cuts from `texts`, per configuration, best of `trials`.

    The windows are cut as the service cuts them (runners/windows.py, with the window and stride
    `/models` reported) and run in length-sorted batches, whole passes over the set only (a lane
    finishes the pass it is in when the time is up: a part pass would weigh the short or the long
    windows more): a configuration's texts/s is the texts of its passes over their time.
    """
    import torch

    from bench.hotpath import RawModel, on_lanes
    from runners.windows import reading_for

    raw = RawModel(lab)
    labels = [raw.labels[i] for i in range(len(raw.labels))]
    cut = reading_for(lab.demo().settings(long_text="windows", window_tokens=reading["window"], window_stride=reading["stride"]),
                      raw.tokenizer, raw.max_length, labels)
    inputs: list[list[int]] = []
    for i, text in enumerate(texts):
        encoded = raw.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        pieces, _ = cut.cut(i, encoded["input_ids"], encoded["offset_mapping"])
        inputs += [cut.model_input(p) for p in pieces]
    inputs.sort(key=len)
    chars_per_text = sum(map(len, texts)) / len(texts)
    previous = torch.get_num_threads()
    runs: dict[str, dict[str, Any]] = {}
    try:
        for _ in range(trials):
            for threads, batch, lanes in RAW_WINDOW_CONFIGS:
                torch.set_num_threads(threads)
                batches = [inputs[k:k + batch] for k in range(0, len(inputs), batch)]
                raw.predict_inputs(batches[-1])  # warm the longest shape
                passes = [0] * lanes
                start = time.perf_counter()

                def lane(k: int, start: float = start, batches: list[list[list[int]]] = batches, passes: list[int] = passes,
                         lanes: int = lanes) -> None:
                    first = k * len(batches) // lanes  # lanes start at different places in the set, each pass whole
                    while time.perf_counter() - start < seconds:
                        for j in range(len(batches)):
                            raw.predict_inputs(batches[(first + j) % len(batches)])
                        passes[k] += 1

                on_lanes(lane, lanes)
                elapsed = time.perf_counter() - start
                texts_s = sum(passes) * len(texts) / elapsed
                row = runs.setdefault(f"threads={threads},batch={batch},sorted" + ("" if lanes == 1 else f",lanes={lanes}"),
                                      {"threads": threads, "batch": batch, "lanes": lanes, "trials": []})
                row["trials"].append(round(texts_s, 2))
                if texts_s >= row.get("texts_per_s", 0):
                    row.update(texts_per_s=texts_s, chars_per_s=texts_s * chars_per_text, windows_per_s=sum(passes) * len(inputs) / elapsed,
                               passes=sum(passes))
    finally:
        torch.set_num_threads(previous)
    top = max(runs.values(), key=lambda r: r["texts_per_s"])
    return {"runs": runs, "best": top, "windows": len(inputs), "texts": len(texts), "chars_per_text": round(chars_per_text, 1),
            "window": cut.window, "stride": cut.stride}


def run(lab: Lab, quick: bool) -> AreaReport:
    from training.data import compose

    report = AreaReport("robustness", "length robustness: recall / false positives by length per REGISTRY_LONG_TEXT mode; "
                                      "throughput windows vs truncate")
    per_bucket, duration, warmup, rounds = (16, 4.0, 1.5, 1) if quick else (None, 12.0, 3.0, 2)
    raw_s, raw_trials = (0.8, 1) if quick else (3.0, 2)
    demo = lab.demo()

    # Services first (they start while this process measures accuracy: a start mostly waits on imports).
    pool = ThreadPoolExecutor(max_workers=2)
    f_win = pool.submit(lab.service, REGISTRY_LONG_TEXT="windows")
    f_trunc = pool.submit(lab.service, REGISTRY_LONG_TEXT="truncate")
    # The alternative for long windows: one forward of 2 torch threads at a time instead of two lanes of one.
    f_wide = pool.submit(lab.service, REGISTRY_LONG_TEXT="windows", REGISTRY_FORWARD_THREADS="1", REGISTRY_TORCH_THREADS="2")
    services: list[Any] = []
    try:
        acc = accuracy_by_length(lab, per_bucket)
        (win, win_ready), (trunc, trunc_ready), (wide, wide_ready) = f_win.result(), f_trunc.result(), f_wide.result()
        services += [win, trunc, wide]
        window = acc["windows"]["window"] or 512
        short, mixed, info = traffic(lab, window)
        subjects = {"windows": win, "truncate": trunc, WIDE: wide}
        answers = {mode: svc.classify(mixed).json() for mode, svc in subjects.items()}
        reading = get_json(win.client, "/models")["models"][lab.demo().name]["runner"]["reading"]
        bodies = {"short": [json.dumps({"texts": [t]}).encode() for t in short],
                  "mixed": [json.dumps({"texts": [t]}).encode() for t in mixed]}
        results: dict[str, dict[str, list[LoadResult]]] = {kind: {m: [] for m in subjects} for kind in bodies}
        for r in range(rounds):
            order = list(subjects) if r % 2 == 0 else list(reversed(subjects))  # alternate who goes first
            for kind in bodies:
                for mode in order:
                    results[kind][mode].append(run_load(subjects[mode].url, "/classify", bodies[kind], CLIENTS, duration, warmup))
    finally:
        for svc in services:
            svc.stop()
        pool.shutdown(wait=True)
    raw = raw_windows(lab, mixed, reading, raw_s, raw_trials)  # the machine to itself: the services are down

    def rps(kind: str, mode: str) -> float:
        return sum(x.rps for x in results[kind][mode]) / len(results[kind][mode])

    def bad(kind: str, mode: str) -> int:
        return sum(x.bad for x in results[kind][mode])

    def p99(kind: str, mode: str) -> float:
        return max((x.p99_ms or 0) for x in results[kind][mode])

    # -- accuracy by length ------------------------------------------------------------------------
    w, t, h = acc["windows"], acc["truncate"], acc["head_tail"]
    bare = w["recall"]["0"]
    fpr_short = w["fpr"]["0"]
    names = {"0": "bare (0 sentences before)", "1": "after 1 benign sentence", "2": "after 2 benign sentences",
             "5": "after 5 benign sentences", "20": "after 20 benign sentences", compose.PAST_512: "past 512 tokens of benign text",
             compose.START_LONG: "first, then ~3,000 characters of benign text"}
    for b in compose.BUCKETS:
        report.add(f"recall, injection {names[b]}: windows", w["recall"][b], "x", "truncate", t["recall"][b], key=f"recall_{b}",
                   note=f"head_tail {h['recall'][b]:.3f}; windows vs its own bare recall {bare:.3f}: "
                        f"{(w['recall'][b] or 0) - (bare or 0):+.3f}")
    for b in compose.BUCKETS:
        report.add(f"false-positive rate, benign {names[b]}: windows", w["fpr"][b], "x", "truncate", t["fpr"][b], key=f"fpr_{b}",
                   note=f"head_tail {h['fpr'][b]:.3f}")
    def drop(mode: dict[str, Any]) -> dict[str, float]:
        return {b: (mode["recall"]["0"] or 0) - (mode["recall"][b] or 0) for b in compose.BUCKETS}

    gaps = drop(w)
    worst = max(gaps, key=gaps.__getitem__)
    report.add("windows: largest recall drop from bare injections, any length", gaps[worst], "x", key="recall_gap_windows",
               note=f"at {names[worst]}; truncate's largest drop {max(drop(t).values()):.3f}, head_tail's {max(drop(h).values()):.3f}")
    longer = [b for b in compose.BUCKETS if b != "0"]
    worst_fpr = max(longer, key=lambda b: w["fpr"][b] or 0)
    report.add("windows: highest false-positive rate on longer benign texts, vs on short ones", w["fpr"][worst_fpr], "x",
               "false-positive rate on short (bare) benign texts", fpr_short, key="fpr_long_vs_short",
               note=f"at {names[worst_fpr]}; excess over short {(w['fpr'][worst_fpr] or 0) - (fpr_short or 0):+.3f}")
    report.add("windows: false-positive excess on longer texts over short ones", (w["fpr"][worst_fpr] or 0) - (fpr_short or 0), "x",
               key="fpr_excess_windows")

    # -- throughput ----------------------------------------------------------------------------------
    short_chars = info["short_chars_mean"]
    for kind, what in (("short", "short-only traffic"), ("mixed", f"mixed-length traffic ({info['mixed_long_texts']} of "
                                                                    f"{info['mixed_texts']} texts longer than a window)")):
        report.add(f"throughput, {what}, {CLIENTS} clients: windows", rps(kind, "windows"), "req/s", "truncate",
                   rps(kind, "truncate"), key=f"{kind}_rps_windows_vs_truncate",
                   note=f"p99 windows {p99(kind, 'windows'):.0f} ms / truncate {p99(kind, 'truncate'):.0f} ms; "
                        f"non-200 + errors {bad(kind, 'windows')} / {bad(kind, 'truncate')}; rounds "
                        + ", ".join(f"{a.rps:.1f}/{b.rps:.1f}" for a, b in zip(results[kind]["windows"], results[kind]["truncate"])))
    # Long texts at the model's own speed: characters/s of whole-text answers vs the raw model on the same windows.
    chars = raw["chars_per_text"]
    top = raw["best"]
    report.add(f"mixed-length traffic, windows service, {CLIENTS} clients, vs the raw model on the same windows",
               rps("mixed", "windows") * chars, "chars/s", "raw model, the same windows, best batching", top["chars_per_s"],
               key="mixed_chars_vs_raw_windows",
               note=f"{rps('mixed', 'windows'):.1f} texts/s vs raw {top['texts_per_s']:.1f} texts/s ({top['windows_per_s']:.1f} windows/s, "
                    f"threads {top['threads']}, batch {top['batch']}, lanes {top['lanes']}); {raw['windows']} model inputs of <= "
                    f"{raw['window']} tokens (stride {raw['stride']}) for {raw['texts']} texts of {chars:.0f} characters on average")
    report.add(f"mixed-length traffic, {WIDE}, {CLIENTS} clients, vs the raw model on the same windows",
               rps("mixed", WIDE) * chars, "chars/s", "raw model, the same windows, best batching", top["chars_per_s"],
               key="mixed_chars_wide_vs_raw_windows",
               note=f"{rps('mixed', WIDE):.1f} texts/s, p99 {p99('mixed', WIDE):.0f} ms; vs the default lanes "
                    f"{rps('mixed', WIDE) / max(rps('mixed', 'windows'), 1e-9):.2f}x")
    report.add(f"short-only traffic, {WIDE}, {CLIENTS} clients, vs the default lanes", rps("short", WIDE), "req/s",
               "windows, default lanes", rps("short", "windows"), key="short_rps_wide_vs_default",
               note=f"p99 {p99('short', WIDE):.0f} ms; non-200 + errors {bad('short', WIDE)} short, {bad('mixed', WIDE)} mixed")
    report.add(f"short-only traffic, windows service, {CLIENTS} clients, in characters/s", rps("short", "windows") * short_chars,
               "chars/s", "mixed-length traffic, the same service", rps("mixed", "windows") * chars, key="chars_short_vs_mixed",
               note="per character, what short texts cost against a mix with long ones (whose windows batch with the short texts)")
    report.add(f"accuracy on the demo's gate set ({compose.GATE_PATH.name}): windows", w["gate_accuracy"], "x", "truncate",
               t["gate_accuracy"], key="gate_accuracy", note=f"head_tail {h['gate_accuracy']:.3f}")
    report.add(f"non-200 answers + errors, all traffic, {CLIENTS} clients", float(sum(bad(k, m) for k in bodies for m in subjects)),
               "count", key="bad_32")

    # The service agrees with the in-process runner on what it flags (the same reading, through HTTP).
    service_flags = {m: sum(p["label"] == "INJECTION" for p in a["predictions"]) for m, a in answers.items()}
    windows_read = {m: sum(int(p.get("windows", 1)) for p in a["predictions"]) for m, a in answers.items()}
    report.notes.append(
        f"held-out length set: {acc['rows']['0']['INJECTION']} injections and {acc['rows']['0']['SAFE']} benign texts per bucket "
        f"({'capped for --quick' if per_bucket else 'all held-out pieces'}); windows of {window} tokens (the served model's); "
        f"runner time windows {w['seconds']} s ({w['windows_read']} windows for {w['texts']} texts), truncate {t['seconds']} s, "
        f"head_tail {h['seconds']} s")
    report.notes.append("recall by bucket  windows / truncate / head_tail: " + "; ".join(
        f"{b} {w['recall'][b]:.2f}/{t['recall'][b]:.2f}/{h['recall'][b]:.2f}" for b in compose.BUCKETS))
    report.notes.append("false positives by bucket  windows / truncate / head_tail: " + "; ".join(
        f"{b} {w['fpr'][b]:.2f}/{t['fpr'][b]:.2f}/{h['fpr'][b]:.2f}" for b in compose.BUCKETS))
    report.notes.append(f"traffic: {info}; the mixed texts through each service: flagged {service_flags}, windows read {windows_read}")
    report.notes.append(f"each measurement {warmup:g} s warm-up + {duration:g} s, {rounds} round(s), kinds and modes interleaved; "
                        f"services ready in {win_ready:.1f} s (windows), {trunc_ready:.1f} s (truncate) and {wide_ready:.1f} s ({WIDE})")
    report.detail = {
        "accuracy": acc, "traffic": info,
        "throughput": {kind: {m: [x.to_dict() for x in v] for m, v in modes.items()} for kind, modes in results.items()},
        "service_flags_on_mixed": service_flags, "service_windows_on_mixed": windows_read,
        "raw_windows": raw, "service_reading": reading,
        "demo_model": {"registered": demo.registered_name, "meta": demo.meta},
        "durations": {"measured_s": duration, "warmup_s": warmup, "rounds": rounds, "per_bucket": per_bucket},
    }
    return report
