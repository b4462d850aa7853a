"""What an evaluation writes and prints: ``config.json`` (checked on resume), summaries, comparisons, the console table.

``config.json`` records the configuration that decides the episodes' results and the fingerprints of the
models that produced them (:mod:`agentrm.search.resolve`). A rerun into the same ``out_dir`` resumes only
when both match: another configuration, or the same configuration with a retrained RM or policy, is refused
in one line (``--resume false`` starts over, or choose another ``out_dir``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentrm.checks import ConfigError, differing_fields
from agentrm.search.compare import comparisons_markdown, method_label, paired_comparisons, write_comparisons
from agentrm.search.report import plot_scaling, print_table, summarize, to_markdown, write_csv
from agentrm.search.specs import PolicySpec, ScorerSpec

if TYPE_CHECKING:
    from agentrm.search.evaluate import EvalConfig

RESULT_FIELDS = ("held_in", "held_out", "episodes", "seed", "train_envs", "train_seed", "policy", "scorers", "greedy",
                 "best_of_n", "beam", "beam_max_depth", "beam_episodes", "tie_break")
"""The fields of :class:`~agentrm.search.evaluate.EvalConfig` that decide the results (the rest: how it runs)."""


def recorded_config(config: EvalConfig, fingerprints: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready record of what decides the results, with the models' fingerprints."""
    rec = {
        "held_in": [str(s) for s in config.sets["held_in"]],
        "held_out": [str(s) for s in config.sets["held_out"]],
        "train_envs": [str(s) for s in config.train_specs],
        "policy": asdict(config.policy),
        "scorers": [asdict(s) | (_judge_decoding(s) if s.kind == "judge" else {}) for s in config.scorers],
        "beam": [list(b) for b in config.beam],
    }
    rec.update({k: getattr(config, k) for k in RESULT_FIELDS if k not in rec})
    return json.loads(json.dumps({**rec, "fingerprints": fingerprints}))


def _judge_decoding(spec: ScorerSpec) -> dict[str, Any]:
    """How a judge decodes, as recorded: its effective temperature, so a run decoded otherwise (an older default) is
    not resumed; a sampling judge's seeding too (by prompt: :meth:`agentrm.policies.chat.ChatClient.chat`'s key), so
    a run whose judge was seeded by the order of its calls (older versions) is not continued with other seeds."""
    temperature = spec.judge_decoding_temperature
    return {"judge_temperature": temperature} | ({"judge_seeds": "by prompt"} if temperature > 0 else {})


def _with_new_defaults(stored: dict[str, Any], config: EvalConfig) -> dict[str, Any]:
    """``stored`` with every policy/scorer option added since it was written filled in at its default value
    (a run of an older version resumes when the new option keeps its default)."""
    stored = json.loads(json.dumps(stored))
    pairs = [(config.policy, stored.get("policy"))] + list(zip(config.scorers, stored.get("scorers") or []))
    for spec, got in pairs:
        if isinstance(got, dict):
            defaults = asdict(PolicySpec() if isinstance(spec, PolicySpec) else ScorerSpec())
            for key, value in asdict(spec).items():
                if key not in got and value == defaults.get(key):
                    got[key] = value
    return stored


def check_resumable(out: Path, config: EvalConfig, fingerprints: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with another configuration or other models; write ``config.json``."""
    current = recorded_config(config, fingerprints)
    cfg_path = out / "config.json"
    if config.resume and cfg_path.exists() and (out / "episodes.jsonl").exists():
        stored = _with_new_defaults(json.loads(cfg_path.read_text()), config)
        old = stored.pop("fingerprints", None)
        new = dict(current)
        new.pop("fingerprints")
        if stored != new:
            raise ConfigError(f"out_dir: {out} holds episodes of another configuration "
                              f"({differing_fields(stored, new, [*RESULT_FIELDS, *sorted(set(stored) | set(new))])}); "
                              "pick another out_dir or pass --resume false")
        if old is not None and old != fingerprints:
            raise ConfigError(f"out_dir: {out} holds episodes of other models ({_changed(old, fingerprints)}); "
                              "the configuration is the same but the weights changed since. Pick another out_dir "
                              "or pass --resume false")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(current, indent=2))


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [] if old.get("policy") == new.get("policy") else [f"policy {old.get('policy')} -> {new.get('policy')}"]
    for label, fp in (new.get("scorers") or {}).items():
        before = (old.get("scorers") or {}).get(label)
        if before != fp:
            diffs.append(f"scorer {label!r} {before} -> {fp}")
    return "; ".join(diffs) or "fingerprints differ"


def reply_report(policies: list[Any]) -> dict[str, Any] | None:
    """Totals of the LM policies' :class:`~agentrm.policies.prompt.ReplyStats` (``None`` for scripted policies)."""
    stats = [p.reply_stats for p in policies if hasattr(p, "reply_stats")]
    if not stats:
        return None
    tot = {k: sum(getattr(s, k) for s in stats) for k in ("replies", "invalid", "unresolved")}
    tot["invalid_rate"] = tot["invalid"] / tot["replies"] if tot["replies"] else 0.0
    tot["invalid_examples"] = [e for s in stats for e in s.examples][:10]
    return tot


def cache_report(scorers: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    """Per scorer with a prefix cache: its byte budget, the most bytes it held, the entries it evicted to keep
    the budget, the entries too large to store, and the entry cap's LRU turnover (``entry_cap_drops``)."""
    out = {}
    for label, scorer in scorers.items():
        cache = getattr(scorer, "prefix_cache", None)
        if cache is not None:
            out[label] = {"budget_bytes": getattr(cache, "budget", None), "peak_bytes": getattr(cache, "peak_bytes", None),
                          "evictions": scorer.counters.cache_evictions, "oversized": scorer.counters.cache_oversized,
                          "entry_cap_drops": getattr(cache, "entry_cap_drops", None)}
    return out


def write_outputs(config: EvalConfig, out: Path, rows: list[dict[str, Any]], policies: list[Any],
                  scorers: dict[str, Any] | None = None) -> list[dict]:
    """Write the summaries, plot and comparisons of ``rows``; print what ``config`` asks for; return the summary.

    ``scorers``: the run's scorers; their prefix caches' budgets, peaks and evictions (this process) go to
    ``cache.json`` and one console line each when anything was evicted."""
    caches = cache_report(scorers or {})
    if caches:
        (out / "cache.json").write_text(json.dumps(caches, indent=2))
        for label, c in caches.items():
            if c["evictions"] or c["oversized"]:
                print(f"prefix cache of {label}: {c['evictions']} entries evicted and {c['oversized']} too large to "
                      f"store to keep its budget of {c['budget_bytes']} bytes (peak {c['peak_bytes']}); a larger "
                      "cache_bytes would save their re-forwarding")
    replies = reply_report(policies)
    if replies is not None:  # LM policies: how many replies held no valid action (never silent)
        (out / "policy_replies.json").write_text(json.dumps(replies, indent=2))
        print(f"policy replies: {replies['replies']}, invalid: {replies['invalid']} "
              f"({replies['invalid_rate']:.1%}), still invalid after resampling: {replies['unresolved']} "
              f"(details: {out / 'policy_replies.json'})")
    summary = summarize(rows)
    write_csv(summary, out / "summary.csv")
    (out / "summary.md").write_text(to_markdown(summary))
    plot_scaling(summary, out / "scaling.png")
    comparisons = paired_comparisons(rows, seed=config.seed)
    write_comparisons(comparisons, out)
    if config.show and config.verbose:
        print_table(summary, title=f"search evaluation ({out})")
        if comparisons:
            print("paired differences in success (same episodes; 95% bootstrap CI):")
            print(comparisons_markdown(comparisons))
    elif config.show:
        print(compact_table(summary))
        print(f"details: {out}/summary.md (every row), comparisons.md (paired differences with 95% CIs), "
              "episodes.jsonl, scaling.png; --verbose true prints them")
    return summary


def compact_table(summary: list[dict[str, Any]]) -> str:
    """One line per method: success held-in / held-out and RM tokens forwarded per episode (all episodes)."""
    by: dict[str, dict[str, Any]] = {}
    for r in summary:
        entry = by.setdefault(method_label(r), {"tokens": 0.0, "episodes": 0})
        entry[r["env_set"]] = r["success_rate"]
        entry["tokens"] += (r.get("tokens_scored") or 0.0) * r["episodes"]
        entry["episodes"] += r["episodes"]
    width = max([len("method")] + [len(k) for k in by])
    lines = [f"{'method':<{width}}  held-in  held-out  RM tokens/ep"]
    for label, e in by.items():
        cells = [f"{e[s]:7.3f}" if s in e else f"{'-':>7}" for s in ("held_in", "held_out")]
        tokens = e["tokens"] / e["episodes"] if e["episodes"] else 0.0
        lines.append(f"{label:<{width}}  {cells[0]}  {cells[1]:>8}  {tokens:12,.0f}" if tokens else
                     f"{label:<{width}}  {cells[0]}  {cells[1]:>8}  {'-':>12}")
    return "\n".join(lines)
