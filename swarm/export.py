"""The trained model out of a swarm: gather every stage's weights from its online replicas, check each download
against the stage's other replicas, and write one ``transformers`` model directory.

Gathering (:func:`gather_stage`) is a joiner's verified state download applied to the exporter: parameters come
from a replica picked at random (``rpc_parameters``), are checked for names, shapes and finite values, and then
held against the other online replicas by a random sketch under a seed picked only *after* the download
(``swarm.replica_sync.param_sketch`` / ``state_verdict``), so a source cannot shape its parameters to pass. A
download the others do not vouch for is refused with the reason and the next replica is tried; a stage with no
replica its peers vouch for fails the export with a clear error. A stage with a single online replica has nobody to
check against: its weights are taken and the export says so (``verified_by: 0``).

The directory (:func:`write_export`) holds ``config.json`` and ``model.safetensors`` (``LlamaForCausalLM``), the
tokenizer's files, ``swarm.json`` (run id, step, each stage's epoch, source and verification, the swarm's own
evaluation loss) and a ``README.md`` model card; ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it. :func:`load_export_stage` reads one stage's slice back, for a swarm
that resumes from an export.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.p2p import P2P, PeerID

from swarm.checkpoint import CheckpointError, StageState, check_model_config
from swarm.config import ModelConfig, to_dict
from swarm.model import StageModule, causal_lm_loss, llama_config
from swarm.replica_sync import param_sketch, sketch_distance, state_verdict
from swarm.stage_server import (
    PARAMS_COOLDOWN_S,
    SKETCH_COOLDOWN_S,
    StageServer,
    ask_state_sketch,
    namespace,
)
from swarm.transport import TensorLimits, TransportError, pack, receive

logger = logging.getLogger(__name__)

SUMMARY_FILE = "swarm.json"
SKETCH_RETRY_S = SKETCH_COOLDOWN_S + 0.5  # a replica answers one sketch per caller per cooldown
DOWNLOAD_ATTEMPTS = 2  # per replica: a download that broke off (a stream cut short) is asked again once, last


class ExportError(RuntimeError):
    """The swarm's weights could not be gathered (no replica online, none vouched for) or written."""


@dataclass
class StageDownload:
    stage: int
    source: str
    epoch: int
    verified_by: int  # other replicas whose sketches matched
    verdict: str
    refused: List[Tuple[str, str]] = field(
        default_factory=list
    )  # (replica, reason) whose downloads were refused
    params: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def params_limits(module: torch.nn.Module) -> TensorLimits:
    """What an exporter accepts from a replica: exactly this stage's parameters in float32, and nothing larger."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    return TensorLimits(
        max_tensors=len(params),
        max_ndim=max(p.dim() for p in params),
        max_elements=max(p.numel() for p in params),
        max_total_bytes=int(total * 4 * 1.05) + (1 << 20),
        dtypes=("float32",),
    )


def check_download(
    names: Any, tensors: Sequence[torch.Tensor], module: torch.nn.Module
) -> Dict[str, torch.Tensor]:
    """The downloaded parameters by name if they are this stage's, whole and finite; else TransportError."""
    expected = [(n, p) for n, p in module.named_parameters()]
    if not isinstance(names, list) or names != [n for n, _ in expected]:
        raise TransportError("the replica's parameter names are not this stage's")
    if len(tensors) != len(expected):
        raise TransportError(f"{len(tensors)} tensors for {len(expected)} parameters")
    out = {}
    for (name, param), tensor in zip(expected, tensors):
        if tuple(tensor.shape) != tuple(param.shape):
            raise TransportError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise TransportError(f"{name} is not finite")
        out[name] = tensor
    return out


async def _download(
    stub_of, peer: str, limits: TensorLimits, timeout: float
) -> Tuple[Any, List[torch.Tensor], int]:
    async def go():
        stream = await stub_of(peer).rpc_parameters(pack({})[0])
        return await receive(stream, limits)

    received = await asyncio.wait_for(go(), timeout)
    meta = received.metadata
    if not meta.get("ok"):
        raise TransportError(str(meta.get("error", "refused"))[:200])
    epoch = meta.get("epoch")
    if type(epoch) is not int or epoch < 0:
        raise TransportError("no valid epoch")
    return meta.get("names"), received.tensors, epoch


async def gather_stage(
    stub_of: Callable[[str], Any],
    stage: int,
    module: torch.nn.Module,
    replicas: Sequence[str],
    *,
    sketch_dims: int,
    tolerance: float,
    timeout: float = 300.0,
    rng: Optional[random.Random] = None,
) -> StageDownload:
    """One stage's parameters from a random replica that the others vouch for (see the module docstring).

    ``stub_of(peer)`` gives a stub of that peer's stage server; ``replicas`` are the stage's online peers."""
    rng = rng or random.Random(int.from_bytes(os.urandom(8), "little"))
    order = list(replicas)
    rng.shuffle(order)
    limits = params_limits(module)
    refused: List[Tuple[str, str]] = []
    attempts: Dict[str, float] = {}  # source -> when its last download began
    for source in order:  # grows: a failed download goes to the back of the queue, once
        if source in attempts:
            # a replica serves one download per caller per cooldown; hivemind ends a broken stream as if it were
            # complete, so a transient cut looks like a short answer (seen in CI: 20 tensors for 28 parameters)
            await asyncio.sleep(max(0.0, attempts[source] + PARAMS_COOLDOWN_S + 0.5 - time.monotonic()))
        attempts[source], again = time.monotonic(), True
        try:
            names, tensors, epoch = await _download(stub_of, source, limits, timeout)
            # what it served is judged as it stands, unless it is short of tensors (a stream cut off)
            again = isinstance(names, list) and len(tensors) < len(names)
            params = check_download(names, tensors, module)
        except Exception as e:  # a replica that fails to serve is one refusal, never the end of the export
            reason = " ".join(
                (str(e) if isinstance(e, TransportError) else f"{type(e).__name__}: {e}").split()
            )
            refused.append((source, f"download failed: {reason}"[:300]))
            logger.warning(f"stage {stage}: no parameters from {source[-8:]}: {reason}")
            # a stall is not asked again: it would cost another whole timeout
            if again and not isinstance(e, asyncio.TimeoutError) and order.count(source) < DOWNLOAD_ATTEMPTS:
                order.append(source)
            continue
        others = [p for p in replicas if p != source]
        seed = rng.getrandbits(62)  # picked after the download: the source could not shape its answer to it
        mine = param_sketch(list(params.values()), seed, sketch_dims)
        own, *answers = await asyncio.gather(
            *(
                ask_state_sketch(
                    stub_of(p),
                    seed,
                    sketch_dims,
                    limits=TensorLimits(),
                    timeout=30.0,
                    retry_after_s=SKETCH_RETRY_S,
                )
                for p in [source, *others]
            )
        )
        distances = [sketch_distance(mine, a[1]) for a in answers if a is not None and abs(a[0] - epoch) <= 1]
        ok, verdict = state_verdict(distances, tolerance)
        # the source must stand by what it served: its own sketch of its weights has to match the download (the
        # only check there is when it is the stage's one replica; a replica that serves one thing and computes
        # with another is caught here even where no other replica answers)
        if own is not None and sketch_distance(mine, own[1]) > tolerance:
            ok, verdict = (
                False,
                (
                    f"what it served differs from its own sketch of its weights (relative distance "
                    f"{sketch_distance(mine, own[1]):.3g} > {tolerance})"
                ),
            )
        elif own is None and not distances:
            ok, verdict = (
                False,
                "it is the only replica to ask and did not vouch for what it served (no sketch)",
            )
        elif not distances:
            verdict = "the stage's only replica to answer: its download matches its own sketch, nobody else's"
        if not ok:
            refused.append((source, verdict))
            logger.warning(
                f"stage {stage}: refused the parameters of {source[-8:]} (epoch {epoch}): {verdict}"
            )
            continue
        verified = sum(d <= tolerance for d in distances)
        logger.info(f"stage {stage}: parameters of epoch {epoch} from {source[-8:]}: {verdict}")
        return StageDownload(stage, source, epoch, verified, verdict, refused, params)
    if not order:
        raise ExportError(f"stage {stage}: no replica is online")
    raise ExportError(
        f"stage {stage}: no replica's parameters are vouched for by the others, so there is no quorum to export "
        f"from ({'; '.join(f'{p[-8:]}: {why}' for p, why in refused)})"
    )


# ---- the model directory ----------------------------------------------------------------------------------------
def stage_modules(
    model_cfg: ModelConfig, num_stages: int, params: Dict[int, Dict[str, torch.Tensor]]
) -> List[StageModule]:
    """The swarm's own stage modules holding the gathered weights (for the swarm's evaluation of an export)."""
    modules = []
    for stage in range(num_stages):
        module = StageModule(model_cfg, stage, num_stages)
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(params[stage][name])
        modules.append(module.eval())
    return modules


@torch.no_grad()
def pipeline_loss(modules: Sequence[StageModule], blocks: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss of ``blocks`` [N, T] through the stage modules in order (as a swarm computes it)."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch):
        ids = blocks[start : start + batch]
        x = ids
        for module in modules:
            x = module(x)
        total += float(causal_lm_loss(x, ids)) * ids.shape[0]
        count += ids.shape[0]
    return total / max(count, 1)


def write_export(
    out: str,
    model_cfg: ModelConfig,
    params: Dict[str, torch.Tensor],
    tokenizer,
    summary: Dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a ``transformers`` model directory at ``out`` (into a temporary sibling, then renamed into place)."""
    from transformers import LlamaForCausalLM

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: pick another --out, or pass --overwrite")
    config = llama_config(model_cfg)
    config.use_cache = True  # the swarm trains without a KV cache; users generating text want one
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    with torch.device(
        "meta"
    ):  # no weights allocated or initialised only to be overwritten by the gathered ones
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(params, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(
            f"the gathered weights do not make the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(summary))
        umask = os.umask(0)
        os.umask(umask)
        for (
            path
        ) in tmp.iterdir():  # safetensors writes through a private temporary file (0600): a model is shared
            os.chmod(path, 0o644 & ~umask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_card(summary: Dict[str, Any]) -> str:
    stages = summary.get("stages", [])
    rows = "\n".join(
        f"| {s['stage']} | {s['epoch']} | {s['source'][-12:]} | {s['verified_by']} | {len(s.get('refused', []))} |"
        for s in stages
    )
    loss = summary.get("eval_loss")
    model = summary.get("model", {})
    return f"""---
library_name: transformers
tags: [swarm, decentralized-training, llama]
---

# {summary.get("run_id")}: a model trained by a swarm

A LLaMA-style causal LM ({model.get("num_layers")} layers, hidden size {model.get("hidden_size")},
vocabulary {model.get("vocab_size")}) trained by the volunteer swarm `{summary.get("run_id")}` and exported with
`swarm export` at {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(summary.get("exported_at", 0)))}.

- step (optimizer steps of the stages): {summary.get("step")}
- training loss (the swarm's trainers, last reported): {summary.get("train_loss")}
- evaluation loss ({summary.get("eval_blocks", 0)} blocks of {summary.get("seq_len")} tokens, the swarm's own stage
  code on the exported weights): {"n/a" if loss is None else f"{loss:.4f}"}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```

Each stage's weights came from one online replica, checked against the stage's other replicas (random sketches
under a seed picked after the download); `verified by` counts the replicas that matched:

| stage | epoch | source | verified by | refused |
| --- | --- | --- | --- | --- |
{rows}

`swarm.json` holds the same facts in machine-readable form.
"""


def read_summary(directory: str) -> Dict[str, Any]:
    path = Path(directory) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a swarm export (no {SUMMARY_FILE})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("model"), dict):
        raise CheckpointError(f"{path} does not describe a swarm export")
    check_model_config(summary["model"], str(path))
    return summary


def load_export_stage(directory: str, stage: int, num_stages: int) -> StageState:
    """One stage's slice of an exported model (no optimizer state), at the epoch the export recorded for it."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    summary = read_summary(directory)
    model_cfg = ModelConfig(**summary["model"])
    names = [n for n, _ in StageModule(model_cfg, stage, num_stages).named_parameters()]
    path = Path(directory) / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            lacking = [n for n in names if n not in present]
            if lacking:
                raise CheckpointError(
                    f"{path} lacks {len(lacking)} of stage {stage}'s parameters (e.g. {lacking[0]})"
                )
            params = {n: f.get_tensor(n).float() for n in names}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not readable: {e}") from None
    epochs = {s.get("stage"): s.get("epoch") for s in summary.get("stages", []) if isinstance(s, dict)}
    epoch = epochs.get(stage) if isinstance(epochs.get(stage), int) else int(summary.get("step") or 0)
    meta = dict(model=summary["model"], stage=stage, num_stages=num_stages, run_id=summary.get("run_id"))
    return StageState(params=params, optimizer=None, epoch=epoch, meta=meta)


def export_summary(
    run_id: str,
    model_cfg: ModelConfig,
    num_stages: int,
    seq_len: int,
    downloads: Sequence[StageDownload],
    train_loss: Optional[float],
    eval_loss: Optional[float],
    eval_blocks: int,
) -> Dict[str, Any]:
    stages = [
        {k: v for k, v in asdict(d).items() if k != "params"} | {"refused": [list(r) for r in d.refused]}
        for d in downloads
    ]
    return dict(
        format="swarm-export/1",
        run_id=run_id,
        model=to_dict(model_cfg),
        num_stages=num_stages,
        seq_len=seq_len,
        step=min(d.epoch for d in downloads) if downloads else 0,
        stages=stages,
        train_loss=train_loss,
        eval_loss=eval_loss,
        eval_blocks=eval_blocks,
        exported_at=time.time(),
    )


def stub_factory(p2p: P2P, run_id: str) -> Callable[[str], Any]:
    return lambda peer: StageServer.get_stub(p2p, PeerID.from_base58(peer), namespace=namespace(run_id))
