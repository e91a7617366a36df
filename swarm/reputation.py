"""Reputation and blacklist: from each peer's local tallies to swarm-wide verdicts (pure logic, no network).

Every peer keeps a :class:`ReputationLedger` of its counterparts: how many exchanges with each passed the
sentinel's checks (clean) and how many failed (strikes, with reasons). It periodically publishes the ledger as a
signed :class:`~swarm.records.ReputationReport`. Any peer can then run :func:`aggregate` over the reports it
reads and reach the same kind of verdicts on its own; nobody has to be trusted to compute them.

The method, and why:

1. **Fresh identities weigh nothing.** Identities are free (an RSA key), so a report counts only once its
   reporter has been *observed by this aggregator* for ``probation_s`` seconds (age) *and* other aged reporters
   vouch for at least ``probation_work`` clean exchanges with it (verified work). A crowd of brand-new Sybil
   identities therefore has weight 0, however many there are and whatever they claim; so do aged identities
   that never served anyone. Reporters whose key <-> peer id binding the caller could not confirm
   (``reachable``) weigh 0 as well, and their vouching does not count either.
2. **One liar cannot ban.** A peer is blacklisted only when at least ``min_reporters`` distinct weighted
   reporters each accuse it with enough evidence: ``min_strikes`` strikes and a strike ratio of at least
   ``strike_ratio`` of their exchanges with it, overall or among the latest ``RECENT_WINDOW`` (a sleeper that
   turns bad after a long clean record is judged on what it does now). A single reporter, however trusted, only
   lowers a score.
3. **Only neighbours can witness, and a verdict needs a share of them.** A stage peer exchanges tensors only
   with the peers of the adjacent stages (it receives activations from stage ``s - 1`` and gradients from stage
   ``s + 1``) and with the other replicas of its own stage (gradient averaging, state downloads), so when the
   aggregator knows who serves which stage (``stages``), an entry by a reporter that serves neither the peer's
   stage nor one adjacent to it is a claim about exchanges that never happened, and is ignored (for accusations,
   vouching and scores alike). A verdict also needs the accusers to be at least
   ``witness_share`` of the *witnesses* on one side of the peer (the weighted reporters of that adjacent stage
   that exchanged at least ``min_strikes`` tensors with it, accusers included): Byzantine insiders whose honest
   work earned them weight cannot ban an honest peer that the rest of its neighbours find clean. Sides are
   judged separately (and together), since an attacker may tamper with one direction only.
4. **A banned peer's word stops counting.** Verdicts are recomputed with the blacklisted reporters' weights (and
   vouching) zeroed until the blacklist is stable (at most ``MAX_ROUNDS``), so an attacker that accuses its
   accusers back, or vouches for its own Sybils, loses that influence once it is caught.

Scores: ``weighted clean / weighted (clean + 4 x strikes)`` over weighted reporters, in [0, 1]; a strike costs
four clean exchanges. A peer no weighted reporter has evidence on scores 1.0 (neutral: unknown is not bad, or
every newcomer would be starved of the work it needs to build a record); a blacklisted peer scores 0.0.

Cost: linear in the reports' entries (:class:`_Entries` turns them into arrays once; a round is a few array sums),
16 ms at 1,000 peers and 0.27 s at 10,000 (experiments/reputation_speed); :class:`Aggregator` skips the work when
the inputs did not change.

Known limit: a clique of Sybils that stay online past probation, announce a stage next to their target's and
vouch for each other's "work" gains weight, and when they are ``min_reporters`` and ``witness_share`` of its
witnesses on that side they can ban an honest peer (so can Byzantine insiders that make up that share of its
neighbours). Admission controls bound the size of such a
clique (a proof-of-work cost per identity, or an allowlist of identities signed by a swarm authority); they
live outside this module.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Set

import numpy as np

from swarm.peer_table import DEFAULT_MAX_PEERS, PeerTable
from swarm.records import (
    MAX_REPORT_ENTRIES,
    MAX_REPORT_REASONS,
    MAX_TTL_S,
    RECENT_WINDOW,
    BlacklistRecord,
    ReputationReport,
)

STRIKE_PENALTY = 4.0  # a strike outweighs this many clean exchanges in a score
MAX_ROUNDS = 5  # blacklist / re-weigh iterations
# a ledger's tally with at least this many exchanges is kept preferentially (see ReputationLedger): the default
# min_strikes, so every tally that can back an accusation is
ESTABLISHED_EXCHANGES = 3
UNSPECIFIED = "unspecified"
# strike reasons no recomputation settles, so they keep their quorum rules when proofs are required: the averaging
# checks' (swarm.averaging: AVERAGING, AGGREGATE, EVIDENCE, STATE) and the evidence protocol's own (swarm.evidence:
# a receiver that withheld a signed tensor from an auditor, an accuser that other replicas refuted)
UNAUDITABLE = frozenset({"averaging", "aggregate", "evidence", "state", "withheld", "false_accusation"})
SAME_STAGE = (
    0  # the side a replica of the same stage sees a peer from (their gradient averaging, their state)
)


@dataclass(kw_only=True)
class ReputationConfig:
    """Knobs of reputation aggregation and reporting."""

    probation_s: float = (
        600.0  # a reporter weighs nothing until this aggregator has observed it for this long
    )
    probation_work: int = 20  # ... and until other aged reporters vouch for this many clean exchanges with it
    min_reporters: int = 2  # independent weighted reporters needed for a blacklist verdict
    min_strikes: int = 3  # strikes one reporter must have seen for its accusation to count
    strike_ratio: float = 0.2  # ... and strikes / (clean + strikes) it must have seen
    witness_share: float = (
        1 / 3
    )  # accusers needed among the reporters of one adjacent stage that saw >= min_strikes
    report_period_s: float = 5.0  # how often a peer publishes its report
    report_ttl_s: float = 60.0  # how long a published report lives
    # > 0: recomputation audits are on (swarm.evidence), and a peer whose stage has at least this many replicas (an
    # accused, an auditor and an independent checker) is blacklisted only by a proof, or by strikes that no audit
    # can settle (UNAUDITABLE); its statistical strikes only lower its score. 0: every strike counts
    proof_replicas: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.probation_s) and self.probation_s >= 0 and self.probation_work >= 0):
            raise ValueError("reputation: probation_s and probation_work must be finite and >= 0")
        if not (
            self.min_reporters >= 1
            and self.min_strikes >= 1
            and 0 < self.strike_ratio <= 1
            and 0 <= self.witness_share <= 1
        ):
            raise ValueError(
                "reputation: min_reporters >= 1, min_strikes >= 1, strike_ratio in (0, 1], "
                "witness_share in [0, 1]"
            )
        if self.proof_replicas < 0:
            raise ValueError("reputation: proof_replicas must be >= 0")
        if not (0 < self.report_period_s <= self.report_ttl_s <= MAX_TTL_S):
            raise ValueError(f"reputation: need 0 < report_period_s <= report_ttl_s <= {MAX_TTL_S:.0f}")


@dataclass
class Tally:
    """This peer's exchanges with one counterpart."""

    clean: int = 0
    strikes: int = 0
    reasons: Counter = field(default_factory=Counter)  # strikes by reason
    directions: Counter = field(default_factory=Counter)  # exchanges by direction (local diagnostics only)
    recent: deque = field(
        default_factory=lambda: deque(maxlen=RECENT_WINDOW)
    )  # latest outcomes, True = strike


def _established(peer: str, tally: Tally) -> bool:
    return tally.clean + tally.strikes >= ESTABLISHED_EXCHANGES


def tally_table(max_peers: int = DEFAULT_MAX_PEERS) -> PeerTable:
    """The bounded table of a :class:`ReputationLedger` (see there)."""
    return PeerTable(max_peers, protect=_established)


@dataclass
class ReputationLedger:
    """Local per-counterpart tallies of clean exchanges and strikes, published as a :class:`ReputationReport`.

    Bounded: ``tallies`` holds at most ``DEFAULT_MAX_PEERS`` counterparts (:class:`~swarm.peer_table.PeerTable`),
    least recently recorded evicted first, and tallies of at least ``ESTABLISHED_EXCHANGES`` exchanges (every one that
    can accuse, and the work that vouches for a reporter) only once every other tally is established too. A flood of
    fresh ids with one message each therefore evicts itself; to evict an established tally an attacker needs that
    many exchanges from each of ``DEFAULT_MAX_PEERS`` ids within the victim's idle time. An evicted counterpart is
    a stranger again: its clean work and its strikes seen here are forgotten (it drops out of this peer's report),
    and a new tally starts with its next exchange. No realistic swarm has that many counterparts.
    """

    tallies: PeerTable[str, Tally] = field(default_factory=tally_table)

    def record(self, peer: str, ok: bool, direction: str, reason: str = "") -> None:
        """Count one exchange with ``peer``; a failed one is a strike, filed under ``reason`` (else ``direction``)."""
        tally = self.tallies.setdefault(peer, Tally())
        tally.directions[direction] += 1
        tally.recent.append(not ok)
        if ok:
            tally.clean += 1
        else:
            tally.strikes += 1
            tally.reasons[(reason or direction or UNSPECIFIED)[:32]] += 1

    def record_verdict(self, verdict) -> None:
        """Count a sentinel :class:`~swarm.sentinel.Verdict`; a rejection's reason is its statistic (or baseline).
        A rejection that is no evidence about its sender (``verdict.evidence`` False: others deviated alike just
        before, which looks like training drift) is not counted at all."""
        if not verdict.accepted and not getattr(verdict, "evidence", True):
            return
        self.record(
            verdict.sender, verdict.accepted, verdict.direction, verdict.statistic or verdict.baseline
        )

    def flagged(self, peer: str) -> int:
        """How many of ``peer``'s tensors this peer rejected."""
        tally = self.tallies.get(peer)
        return tally.strikes if tally else 0

    def as_dict(self) -> Dict[str, dict]:
        """Plain tallies, for summaries and ``rpc_info``."""
        return {
            peer: {"clean": t.clean, "strikes": t.strikes, "reasons": dict(t.reasons)}
            for peer, t in self.tallies.items()
        }

    def to_report(self, reporter: str, issued_at: float) -> ReputationReport:
        """This ledger as a report: at most 256 peers (those with strikes first, then the most exchanges) and
        at most 8 reasons each (the most frequent). The reporter's own tally, if any, is left out."""
        peers = [p for p in self.tallies if p != reporter]
        peers.sort(
            key=lambda p: (-self.tallies[p].strikes, -(self.tallies[p].clean + self.tallies[p].strikes), p)
        )
        entries = {}
        for peer in peers[:MAX_REPORT_ENTRIES]:
            tally = self.tallies[peer]
            reasons = sorted(tally.reasons.items(), key=lambda item: (-item[1], item[0]))[:MAX_REPORT_REASONS]
            entries[peer] = {
                "clean": tally.clean,
                "strikes": tally.strikes,
                "reasons": dict(reasons),
                "recent_strikes": sum(tally.recent),
            }
        return ReputationReport(reporter=reporter, issued_at=float(issued_at), entries=entries)


@dataclass
class Aggregate:
    """The outcome of :func:`aggregate`."""

    weights: Dict[str, float]  # reporter -> weight of its report (0.0 or 1.0)
    scores: Dict[str, float]  # every peer mentioned -> reputation in [0, 1]
    blacklist: Dict[str, dict]  # peer -> {"reason", "reporters", "strikes"}
    rounds: int  # blacklist / re-weigh iterations run
    converged: bool = True  # False if the blacklist still changed in the last round

    def score(self, peer: str) -> float:
        """The peer's score; 0.0 if blacklisted, 1.0 (neutral) for a peer nobody reported on."""
        return 0.0 if peer in self.blacklist else self.scores.get(peer, 1.0)

    def to_blacklist_record(self, publisher: str, issued_at: float) -> BlacklistRecord:
        """The blacklist as a record (at most 256 peers, those with the most evidence first)."""
        ranked = sorted(
            self.blacklist.items(), key=lambda item: (-item[1]["reporters"], -item[1]["strikes"], item[0])
        )
        entries = {
            peer: {
                "reason": v["reason"][:200],
                "reporters": int(v["reporters"]),
                "strikes": int(v["strikes"]),
            }
            for peer, v in ranked[:MAX_REPORT_ENTRIES]
        }
        return BlacklistRecord(publisher=publisher, issued_at=float(issued_at), entries=entries)


def aggregate(
    reports: Dict[str, ReputationReport],
    first_seen: Dict[str, float],
    now: float,
    cfg: Optional[ReputationConfig] = None,
    reachable: Optional[Set[str]] = None,
    stages: Optional[Dict[str, Iterable[int]]] = None,
    proven: Optional[Dict[str, dict]] = None,
) -> Aggregate:
    """Weigh the reports, reach blacklist verdicts and score every peer mentioned (see the module docstring).

    ``reports`` is keyed by the reporter's peer id (the caller binds it to the signing key; a report whose
    ``reporter`` field disagrees with its key weighs 0). ``first_seen[r]`` is when this aggregator first saw
    reporter ``r`` (missing: now). If ``reachable`` is given, only those reporters may weigh or vouch. If
    ``stages`` (peer id -> the stages it announced) is given, only entries between peers of adjacent stages count;
    an entry where either side announced no stage is ignored. Self-reports (a reporter's entry about itself) are
    ignored everywhere.

    ``proven``: peers a proven accusation convicts (``swarm.evidence.ProofBook.proven``: ``{peer: {"reason",
    "reporters", "strikes"}}``): blacklisted whatever the strikes say, and their reports weigh nothing from the first
    round on.

    Linear in the number of entries: one pass turns the reports into arrays (reporter, peer, side, counts), and
    each blacklist / re-weigh round is a few array sums over them (:class:`_Entries`).
    """
    cfg = cfg or ReputationConfig()
    return _aggregate(
        reports, eligible_reporters(reports, first_seen, now, cfg, reachable), cfg, stages, proven
    )


def eligible_reporters(
    reports: Dict[str, ReputationReport],
    first_seen: Dict[str, float],
    now: float,
    cfg: ReputationConfig,
    reachable: Optional[Set[str]] = None,
) -> FrozenSet[str]:
    """The reporters that may weigh: report bound to its key, past probation's age, reachable (if known)."""
    return frozenset(
        r
        for r, report in reports.items()
        if report.reporter == r
        and now - first_seen.get(r, now) >= cfg.probation_s
        and (reachable is None or r in reachable)
    )


class Aggregator:
    """:func:`aggregate` that recomputes only when its inputs changed: the reports' entries, which reporters are
    eligible (:func:`eligible_reporters`: probation ends with time) and the announced stages. Otherwise it returns
    its last result, which is then exactly what :func:`aggregate` would compute (its output depends on nothing
    else). It takes the reports in reporter order, whatever order they were read in (a DHT read has none), so the
    same reports always give the same scores to the last bit (float sums depend on their order once counts pass
    2^53). ``recomputed`` and ``reused`` count both outcomes."""

    def __init__(self, cfg: Optional[ReputationConfig] = None):
        self.cfg = cfg or ReputationConfig()
        self._inputs = None
        self._result: Optional[Aggregate] = None
        self.recomputed = self.reused = 0

    def __call__(
        self,
        reports: Dict[str, ReputationReport],
        first_seen: Dict[str, float],
        now: float,
        reachable: Optional[Set[str]] = None,
        stages: Optional[Dict[str, Iterable[int]]] = None,
        proven: Optional[Dict[str, dict]] = None,
    ) -> Aggregate:
        reports = dict(sorted(reports.items()))
        eligible = eligible_reporters(reports, first_seen, now, self.cfg, reachable)
        stage_sets = None if stages is None else {peer: frozenset(s) for peer, s in stages.items()}
        inputs = ({r: report.entries for r, report in reports.items()}, eligible, stage_sets, proven or {})
        if self._result is not None and inputs == self._inputs:
            self.reused += 1
            return self._result
        # deep copies are not needed: reports are parsed afresh each time, and the entries are never changed
        self._inputs = inputs
        self._result = _aggregate(reports, eligible, self.cfg, stage_sets, proven)
        self.recomputed += 1
        return self._result


_NO_SIDE = 2  # an entry its reporter cannot have witnessed (sides are -1, SAME_STAGE, +1)


def _side(reporter_stages: FrozenSet[int], peer_stages: FrozenSet[int]) -> int:
    """The side a reporter serving ``reporter_stages`` sees a peer serving ``peer_stages`` from: +1 when the reporter
    serves the next stage (it receives the peer's activations), -1 the previous one (the peer's gradients),
    ``SAME_STAGE`` (0) a replica of the peer's own stage (their gradient averaging and state downloads), else
    ``_NO_SIDE``."""
    offsets = {a - b for a in reporter_stages for b in peer_stages}
    return 1 if 1 in offsets else -1 if -1 in offsets else SAME_STAGE if 0 in offsets else _NO_SIDE


class _Entries:
    """Every counted entry of the reports as arrays, in report order then entry order (so float sums add up in the
    same order as a loop over the reports would): reporter and peer (indices into ``ids``, reporters first), the
    side it sees the peer from, its counts, and whether it accuses / witnesses. Self-entries and entries a reporter
    cannot have witnessed are left out; ``mentioned`` marks every peer an entry that passed the stage rule names."""

    def __init__(self, reports: Dict[str, ReputationReport], cfg: ReputationConfig, stages):
        self.reporters = len(reports)
        peers: List[str] = []
        values: List[dict] = []
        lengths: List[int] = []
        for report in reports.values():
            peers.extend(report.entries)
            values.extend(report.entries.values())
            lengths.append(len(report.entries))
        # reporters first, then every other peer in order of first mention
        self.ids = list(dict.fromkeys(itertools.chain(reports, peers)))
        n = len(self.ids)
        index = dict(zip(self.ids, range(n)))
        src = np.repeat(np.arange(self.reporters, dtype=np.int64), lengths)
        dst_a = np.fromiter(map(index.__getitem__, peers), dtype=np.int64, count=len(peers))
        clean = np.fromiter(map(_CLEAN, values), dtype=np.int64, count=len(values))
        strikes = np.fromiter(map(_STRIKES, values), dtype=np.int64, count=len(values))
        side = np.zeros(len(values), dtype=np.int64)
        if stages is not None:
            # one signature per distinct set of announced stages, and a side per pair of signatures that occurs
            signatures: Dict[FrozenSet[int], int] = {frozenset(): 0}
            sig = np.fromiter(
                (
                    signatures.setdefault(frozenset(stages.get(peer, ())), len(signatures))
                    for peer in self.ids
                ),
                dtype=np.int64,
                count=n,
            )
            sets = list(signatures)
            pairs = sig[src] * len(sets) + sig[dst_a]
            codes, inverse = np.unique(pairs, return_inverse=True)
            table = np.array(
                [_side(sets[c // len(sets)], sets[c % len(sets)]) for c in codes.tolist()], dtype=np.int64
            )
            side = table[inverse.reshape(-1)]
        plausible = side != _NO_SIDE
        self.mentioned = np.zeros(n, dtype=bool)
        self.mentioned[: self.reporters] = True
        self.mentioned[dst_a[plausible]] = True
        keep = plausible & (dst_a != src)
        self.index = np.nonzero(keep)[0]  # positions in ``values`` of the counted entries
        self.values = values
        self.src, self.dst, self.side = src[keep], dst_a[keep], side[keep]
        self.clean, self.strikes = clean[keep], strikes[keep]
        # an accusation needs min_strikes strikes; the ratio test runs on those few, on exact integers
        accuses = self.strikes >= cfg.min_strikes
        provable = _provable(self.ids, cfg, stages)
        for k in np.nonzero(accuses)[0].tolist():
            entry = values[self.index[k]]
            if provable is not None and self.ids[dst_a[self.index[k]]] in provable:
                # audits can prove what this peer sent: only strikes no audit settles may accuse it
                unaudited = sum(c for r, c in entry["reasons"].items() if r in UNAUDITABLE)
                entry = dict(
                    entry,
                    strikes=min(entry["strikes"], unaudited),
                    recent_strikes=min(entry.get("recent_strikes", 0), unaudited),
                )
            accuses[k] = _accuses(entry, cfg)
        self.accuses = accuses
        ms = cfg.min_strikes
        self.witness = accuses | (np.minimum(self.clean, ms) + np.minimum(self.strikes, ms) >= ms)
        # work only needs comparing with probation_work: each entry's share clipped there sums exactly
        self.work_share = np.minimum(self.clean, cfg.probation_work)


def _provable(ids: List[str], cfg: ReputationConfig, stages) -> Optional[Set[str]]:
    """The peers whose every announced stage has at least ``cfg.proof_replicas`` replicas (None: proofs off)."""
    if not cfg.proof_replicas or stages is None:
        return None
    count = Counter(s for peer_stages in stages.values() for s in set(peer_stages))
    return {p for p in ids if stages.get(p) and all(count[s] >= cfg.proof_replicas for s in stages[p])}


_CLEAN = operator.itemgetter("clean")
_STRIKES = operator.itemgetter("strikes")


def _aggregate(
    reports: Dict[str, ReputationReport],
    eligible: Iterable[str],
    cfg: ReputationConfig,
    stages: Optional[Dict[str, Iterable[int]]],
    proven: Optional[Dict[str, dict]] = None,
) -> Aggregate:
    table = _Entries(reports, cfg, stages)
    n, nr = len(table.ids), table.reporters
    forced = np.zeros(n, dtype=bool)  # convicted by a proof (swarm.evidence), whatever the strikes say
    position_all = {p: i for i, p in enumerate(table.ids)}
    for peer in proven or {}:
        if peer in position_all:
            forced[position_all[peer]] = True
    is_eligible = np.zeros(nr, dtype=bool)
    position = {r: i for i, r in enumerate(table.ids[:nr])}
    for r in eligible:
        if r in position:
            is_eligible[position[r]] = True
    exact_work = int(table.work_share.sum()) < 2**53  # float sums of integers are exact below 2^53
    blacklisted = forced.copy()
    rounds, converged = 0, False
    while not converged and rounds < MAX_ROUNDS:
        rounds += 1
        weighted = _weights(table, is_eligible & ~blacklisted[:nr], cfg, exact_work)
        verdicts = _verdicts(table, weighted, cfg) | forced
        converged = bool(np.array_equal(verdicts, blacklisted))
        blacklisted = verdicts
    blacklist = _evidence(table, weighted, blacklisted & ~forced)
    for peer, entry in (proven or {}).items():  # a proof is the verdict's reason, mentioned in reports or not
        blacklist[peer] = dict(entry)
    return Aggregate(
        weights={r: 1.0 if w else 0.0 for r, w in zip(table.ids[:nr], weighted.tolist())},
        scores=_scores(table, weighted, blacklisted),
        blacklist=blacklist,
        rounds=rounds,
        converged=converged,
    )


def _weights(table: _Entries, vouchers: np.ndarray, cfg: ReputationConfig, exact: bool) -> np.ndarray:
    """Per reporter: a voucher (aged, reachable, not blacklisted) whose work other vouchers confirm."""
    by_voucher = vouchers[table.src]
    peers, shares = table.dst[by_voucher], table.work_share[by_voucher]
    if exact:
        work = np.bincount(peers, weights=shares, minlength=len(table.ids))[: table.reporters]
    else:  # shares too large to add up exactly as float64: Python integers
        totals = [0] * len(table.ids)
        for peer, share in zip(peers.tolist(), shares.tolist()):
            totals[peer] += share
        work = np.array([total >= cfg.probation_work for total in totals[: table.reporters]], dtype=bool)
        return vouchers & work
    return vouchers & (work >= cfg.probation_work)


def _verdicts(table: _Entries, weighted: np.ndarray, cfg: ReputationConfig) -> np.ndarray:
    """Blacklist verdicts: per peer, on either side (-1, SAME_STAGE, +1; one side when stages are unknown) or all
    sides together, at least ``min_reporters`` accusers that are at least ``witness_share`` of the witnesses there."""
    counted = weighted[table.src]
    groups = table.dst * 3 + (table.side + 1)
    size = 3 * len(table.ids)
    accusers = np.bincount(groups[counted & table.accuses], minlength=size).reshape(-1, 3)
    witnesses = np.bincount(groups[counted & table.witness], minlength=size).reshape(-1, 3)
    accusers = np.concatenate([accusers, accusers.sum(axis=1, keepdims=True)], axis=1)
    witnesses = np.concatenate([witnesses, witnesses.sum(axis=1, keepdims=True)], axis=1)
    enough = (accusers >= cfg.min_reporters) & (accusers >= cfg.witness_share * witnesses)
    return enough.any(axis=1)


def _evidence(table: _Entries, weighted: np.ndarray, blacklisted: np.ndarray) -> Dict[str, dict]:
    """Each blacklisted peer's verdict: the main reason, its accusers and their strikes."""
    evidence: Dict[int, List[dict]] = {}
    accusing = weighted[table.src] & table.accuses & blacklisted[table.dst]
    for k in np.nonzero(accusing)[0].tolist():
        evidence.setdefault(int(table.dst[k]), []).append(table.values[table.index[k]])
    return {
        table.ids[peer]: {
            "reason": _main_reason(entries),
            "reporters": len(entries),
            "strikes": sum(e["strikes"] for e in entries),
        }
        for peer, entries in evidence.items()
    }


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


def _scores(table: _Entries, weighted: np.ndarray, blacklisted: np.ndarray) -> Dict[str, float]:
    """``weighted clean / weighted (clean + STRIKE_PENALTY x strikes)`` per peer mentioned; 1.0 without evidence."""
    counted = weighted[table.src]
    n = len(table.ids)
    good = np.bincount(table.dst[counted], weights=table.clean[counted].astype(np.float64), minlength=n)
    bad = np.bincount(table.dst[counted], weights=table.strikes[counted].astype(np.float64), minlength=n)
    total = good + STRIKE_PENALTY * bad
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(total > 0, good / np.where(total > 0, total, 1.0), 1.0)
    scores[blacklisted] = 0.0
    return {
        table.ids[p]: s
        for p, s in zip(np.nonzero(table.mentioned)[0].tolist(), scores[table.mentioned].tolist())
    }
