"""The reputation aggregation as it was before it became linear (library commit cf05fa6, swarm/reputation.py):
quadratic in the number of reporters (``_weights`` scans every voucher's report for each reporter). Kept here only
as the benchmark's baseline and as the reference of the property test (tests/test_reputation_speed.py); the
library has one implementation, :func:`swarm.reputation.aggregate`."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Dict, Iterable, List, Optional, Set

from swarm.records import RECENT_WINDOW, ReputationReport
from swarm.reputation import MAX_ROUNDS, SAME_STAGE, STRIKE_PENALTY, UNSPECIFIED, Aggregate, ReputationConfig


def aggregate(
    reports: Dict[str, ReputationReport],
    first_seen: Dict[str, float],
    now: float,
    cfg: Optional[ReputationConfig] = None,
    reachable: Optional[Set[str]] = None,
    stages: Optional[Dict[str, Iterable[int]]] = None,
) -> Aggregate:
    """Weigh the reports, reach blacklist verdicts and score every peer mentioned (see the module docstring).

    ``reports`` is keyed by the reporter's peer id (the caller binds it to the signing key; a report whose
    ``reporter`` field disagrees with its key weighs 0). ``first_seen[r]`` is when this aggregator first saw
    reporter ``r`` (missing: now). If ``reachable`` is given, only those reporters may weigh or vouch. If
    ``stages`` (peer id -> the stages it announced) is given, only entries between peers of adjacent stages count;
    an entry where either side announced no stage is ignored. Self-reports (a reporter's entry about itself) are
    ignored everywhere.
    """
    cfg = cfg or ReputationConfig()
    sides: Optional[Dict[str, Dict[str, int]]] = None
    if stages is not None:
        stages = {peer: set(served) for peer, served in stages.items()}
        reports, sides = _plausible(reports, stages)
    eligible = {
        r
        for r, report in reports.items()
        if report.reporter == r
        and now - first_seen.get(r, now) >= cfg.probation_s
        and (reachable is None or r in reachable)
    }
    blacklist: Dict[str, dict] = {}
    rounds, converged = 0, False
    while not converged and rounds < MAX_ROUNDS:
        rounds += 1
        weights = _weights(reports, eligible - set(blacklist), cfg)
        verdicts = _verdicts(reports, weights, cfg, sides)
        converged = verdicts.keys() == blacklist.keys()
        blacklist = verdicts
    return Aggregate(
        weights=weights,
        scores=_scores(reports, weights, blacklist),
        blacklist=blacklist,
        rounds=rounds,
        converged=converged,
    )


def _plausible(reports: Dict[str, ReputationReport], stages: Dict[str, Set[int]]):
    """The reports with only the entries a reporter can have witnessed (it serves a stage next to the peer's, or the
    same one), and the side each remaining entry sees its peer from: +1 when the reporter serves the next stage (it
    receives the peer's activations), -1 the previous one (the peer's gradients), ``SAME_STAGE`` (0) a replica of
    the peer's own stage (their gradient averaging and state downloads)."""
    kept: Dict[str, ReputationReport] = {}
    sides: Dict[str, Dict[str, int]] = {}
    for r, report in reports.items():
        entries, seen_from = {}, {}
        for peer, e in report.entries.items():
            offsets = {a - b for a in stages.get(r, ()) for b in stages.get(peer, ())}
            side = 1 if 1 in offsets else -1 if -1 in offsets else SAME_STAGE if 0 in offsets else None
            if side is not None:
                entries[peer], seen_from[peer] = e, side
        kept[r] = dataclasses.replace(report, entries=entries)
        sides[r] = seen_from
    return kept, sides


def _entries_about(reports: Dict[str, ReputationReport], reporters: Iterable[str], peer: str) -> List[dict]:
    return [reports[r].entries[peer] for r in reporters if r != peer and peer in reports[r].entries]


def _weights(
    reports: Dict[str, ReputationReport], vouchers: Set[str], cfg: ReputationConfig
) -> Dict[str, float]:
    """1.0 for a voucher (aged, reachable, not blacklisted) whose work other vouchers confirm, else 0.0."""
    weights = {}
    for r in reports:
        work = sum(e["clean"] for e in _entries_about(reports, vouchers, r))
        weights[r] = 1.0 if r in vouchers and work >= cfg.probation_work else 0.0
    return weights


def _verdicts(
    reports: Dict[str, ReputationReport],
    weights: Dict[str, float],
    cfg: ReputationConfig,
    sides: Optional[Dict[str, Dict[str, int]]] = None,
) -> Dict:
    """Blacklist verdicts: per peer, on either side (see :func:`_plausible`; one side when stages are unknown) or
    both together, at least ``min_reporters`` accusers that are at least ``witness_share`` of the witnesses there."""
    accusations: Dict[str, List[dict]] = {}
    # peer -> side -> [accusers, witnesses]
    counts: Dict[str, Dict[int, List[int]]] = {}
    for r, report in reports.items():
        if weights[r] <= 0:
            continue
        for peer, e in report.entries.items():
            if peer == r:
                continue
            accuses = _accuses(e, cfg)
            side = sides[r][peer] if sides is not None else 0
            tally = counts.setdefault(peer, {}).setdefault(side, [0, 0])
            tally[0] += accuses
            tally[1] += accuses or e["clean"] + e["strikes"] >= cfg.min_strikes
            if accuses:
                accusations.setdefault(peer, []).append(e)
    blacklist = {}
    for peer, evidence in accusations.items():
        groups = list(counts[peer].values())
        groups.append([sum(g[0] for g in groups), sum(g[1] for g in groups)])
        if any(
            accusers >= max(cfg.min_reporters, cfg.witness_share * witnesses)
            for accusers, witnesses in groups
        ):
            blacklist[peer] = {
                "reason": _main_reason(evidence),
                "reporters": len(evidence),
                "strikes": sum(e["strikes"] for e in evidence),
            }
    return blacklist


def _accuses(e: dict, cfg: ReputationConfig) -> bool:
    """Enough evidence in one entry: ``min_strikes`` strikes, and a strike ratio of at least ``strike_ratio`` over
    all exchanges or over the latest ``RECENT_WINDOW`` (a sleeper's long clean record does not dilute its attack)."""
    strikes, clean = e["strikes"], e["clean"]
    if strikes < cfg.min_strikes:
        return False
    if strikes / (clean + strikes) >= cfg.strike_ratio:
        return True
    recent = e.get("recent_strikes", 0)
    return recent / min(clean + strikes, RECENT_WINDOW) >= cfg.strike_ratio


def _main_reason(evidence: List[dict]) -> str:
    """The reason cited by the most accusing reporters (ties: the most strikes, then by name)."""
    cited, counts = Counter(), Counter()
    for e in evidence:
        for reason, count in e["reasons"].items():
            if count > 0:
                cited[reason] += 1
                counts[reason] += count
    if not cited:
        return UNSPECIFIED
    return min(cited, key=lambda reason: (-cited[reason], -counts[reason], reason))


def _scores(
    reports: Dict[str, ReputationReport], weights: Dict[str, float], blacklist: Dict
) -> Dict[str, float]:
    good: Dict[str, float] = {r: 0.0 for r in reports}
    bad: Dict[str, float] = {r: 0.0 for r in reports}
    for r, report in reports.items():
        for peer, e in report.entries.items():
            good.setdefault(peer, 0.0)
            bad.setdefault(peer, 0.0)
            if weights[r] > 0 and peer != r:
                good[peer] += weights[r] * e["clean"]
                bad[peer] += weights[r] * e["strikes"]
    scores = {}
    for peer in good:
        total = good[peer] + STRIKE_PENALTY * bad[peer]
        scores[peer] = 0.0 if peer in blacklist else (good[peer] / total if total > 0 else 1.0)
    return scores
