"""Stage checkpoints: one stage's parameters, optimizer state and epoch in a safetensors file, and how a stage peer
saves them periodically and resumes from them.

A checkpoint is ``stage{K}of{N}.safetensors`` in a directory of the peer's own: the parameters under the whole
model's names (``model.layers.3.mlp.up_proj.weight``), the optimizer's tensors under ``optimizer.{index}.{key}``,
and in the header's metadata what the file is for (model config, stage, number of stages, run id, epoch), the
optimizer's non-tensor state and a BLAKE3 digest of every tensor. It is written to a temporary file in the same
directory, flushed and renamed over the old one, so a peer killed mid-save leaves the previous checkpoint whole.

Loading checks everything a peer is about to trust: the digest (a torn or edited file), that the file is for this
model and this cut of it, and that every parameter is there with its shape and finite. A checkpoint only restores
*this* peer; which epoch the stage's replicas continue from is decided as for any lagging replica, by quorum
(``swarm.replica_sync``): a replica that restarts behind a quorum of its stage downloads their state, one ahead of
them keeps its own and is not believed by the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import blake3
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

logger = logging.getLogger(__name__)

FORMAT = "swarm-stage-checkpoint/1"
OPTIMIZER_PREFIX = "optimizer."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, torn, edited, or for another model or stage."""


def checkpoint_path(directory: str, stage: int, num_stages: int) -> Path:
    return Path(directory) / f"stage{stage}of{num_stages}.safetensors"


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """BLAKE3 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = blake3.blake3()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class StageState:
    """What a checkpoint holds: a stage's parameters by name, its optimizer's state_dict, and where it stands."""

    params: Dict[str, torch.Tensor]
    optimizer: Optional[Dict[str, Any]]  # torch optimizer state_dict (param indices as keys), or None
    epoch: int
    meta: Dict[str, Any] = field(default_factory=dict)  # model, stage, num_stages, run_id, saved_at, extra


def _flatten_optimizer(state_dict: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors, rest = {}, {}
    for index, entry in state_dict.get("state", {}).items():
        kept = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIMIZER_PREFIX}{index}.{key}"] = value.detach().to("cpu").clone()
            else:
                kept[key] = value
        if kept:
            rest[str(index)] = kept
    return tensors, {"param_groups": state_dict.get("param_groups", []), "scalars": rest}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], info: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name[len(OPTIMIZER_PREFIX) :].split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, kept in info.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(kept)
    groups = [  # JSON has no tuples: betas and the like come back as the tuples torch made them
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
        for group in info.get("param_groups", [])
    ]
    return {"state": state, "param_groups": groups}


def save_stage_state(path: Path, state: StageState) -> str:
    """Write ``state`` to ``path`` atomically; returns its digest."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.params.items()}
    optimizer_info: Optional[Dict[str, Any]] = None
    if state.optimizer is not None:
        opt_tensors, optimizer_info = _flatten_optimizer(state.optimizer)
        tensors.update(opt_tensors)
    digest = tensors_digest(tensors)
    metadata = {
        "format": FORMAT,
        "epoch": str(int(state.epoch)),
        "digest": digest,
        "meta": json.dumps(state.meta, sort_keys=True),
        "optimizer": json.dumps(optimizer_info) if optimizer_info is not None else "",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # the rename itself survives a crash only once the directory is flushed
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return digest


def load_stage_state(path: Path, progress=None) -> StageState:
    """Read and check a checkpoint written by :func:`save_stage_state` (digest, format); raises CheckpointError.
    ``progress``: a stream to draw a progress bar on (tensors read), e.g. ``sys.stderr``."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            bar = None
            if progress is not None:
                from tqdm import tqdm

                bar = tqdm(total=len(keys), unit="tensor", desc=f"swarm: loading {path.name}", file=progress)
            tensors = {}
            for key in keys:
                tensors[key] = f.get_tensor(key)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a swarm stage checkpoint (format {metadata.get('format')!r})")
    digest = tensors_digest(tensors)
    if digest != metadata.get("digest"):
        raise CheckpointError(
            f"{path} is damaged or was edited: its tensors' digest {digest[:16]}... is not the one it was saved "
            f"with ({str(metadata.get('digest'))[:16]}...)"
        )
    try:
        meta = json.loads(metadata.get("meta") or "{}")
        epoch = int(metadata["epoch"])
        optimizer_info = json.loads(metadata["optimizer"]) if metadata.get("optimizer") else None
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has an unreadable header: {e}") from None
    params = {n: t for n, t in tensors.items() if not n.startswith(OPTIMIZER_PREFIX)}
    opt_tensors = {n: t for n, t in tensors.items() if n.startswith(OPTIMIZER_PREFIX)}
    optimizer = _unflatten_optimizer(opt_tensors, optimizer_info) if optimizer_info is not None else None
    return StageState(params=params, optimizer=optimizer, epoch=epoch, meta=meta)


def check_stage_params(
    params: Dict[str, torch.Tensor], module: torch.nn.Module, where: str
) -> Dict[str, torch.Tensor]:
    """``params`` as this stage's module expects them (every name, its shape, finite), or CheckpointError."""
    expected = dict(module.named_parameters())
    missing = sorted(set(expected) - set(params))
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} of this stage's parameters (e.g. {missing[0]})")
    out = {}
    for name, param in expected.items():
        tensor = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, this stage's model {tuple(param.shape)}"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: {name} is not finite floating point")
        out[name] = tensor
    return out


def check_model_matches(meta: Dict[str, Any], model: Dict[str, Any], stage: int, num_stages: int, where: str):
    """CheckpointError unless the checkpoint was saved for this model config and this stage of this cut."""
    if meta.get("model") != model:
        differ = sorted(
            k
            for k in set(model) | set(meta.get("model") or {})
            if (meta.get("model") or {}).get(k) != model.get(k)
        )
        raise CheckpointError(
            f"{where} is of another model than this swarm's (differs in {', '.join(differ) or 'everything'})"
        )
    if (meta.get("stage"), meta.get("num_stages")) != (stage, num_stages):
        raise CheckpointError(
            f"{where} holds stage {meta.get('stage')} of {meta.get('num_stages')}; this peer serves stage {stage} "
            f"of {num_stages}"
        )


def check_model_config(model: Any, where: str) -> Dict[str, Any]:
    """``model`` if it is a valid ModelConfig as a dict, else CheckpointError."""
    from swarm.config import ModelConfig

    try:
        ModelConfig(**model)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{where} names no valid model config: {e}") from None
    return model


def parse_every(text: str) -> Tuple[int, float]:
    """``--checkpoint-every``: ``N`` (optimizer steps) or ``Ns``/``Nm`` (seconds/minutes) -> (steps, seconds)."""
    value = str(text).strip().lower()
    try:
        if value.endswith("s") or value.endswith("m"):
            seconds = float(value[:-1]) * (60.0 if value.endswith("m") else 1.0)
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError
            return 0, seconds
        steps = int(value)
        if steps < 1:
            raise ValueError
        return steps, 0.0
    except ValueError:
        raise ValueError(
            f"--checkpoint-every takes a number of optimizer steps (e.g. 10) or a duration (e.g. 300s, 5m), "
            f"not {text!r}"
        ) from None


class StageCheckpointer:
    """Saves a stage's state every ``every_steps`` optimizer steps or ``every_s`` seconds (whichever is set).

    ``maybe_save(epoch, snapshot)`` runs on the stage's compute thread between micro-batches, so the parameters are
    never half-way through a step: when a save is due it calls ``snapshot()`` (copies of the tensors) there and
    writes the file on a thread of its own, so the compute thread only pays for the copy. One save at a time; a
    save that falls due while another is writing waits for the next chance."""

    def __init__(
        self, directory: str, stage: int, num_stages: int, every_steps: int = 0, every_s: float = 0.0
    ):
        self.path = checkpoint_path(directory, stage, num_stages)
        self.every_steps, self.every_s = every_steps, every_s
        self.saved_epoch: Optional[int] = None
        self.saved_at = time.monotonic()
        self.saves = 0
        self.last_digest = ""
        self.last_error: Optional[str] = None
        self._writer: Optional[threading.Thread] = None

    def mark(self, epoch: int) -> None:
        """The state at ``epoch`` is on disk already (just loaded): the next save is due from there."""
        self.saved_epoch, self.saved_at = epoch, time.monotonic()

    def due(self, epoch: int, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.saved_epoch is not None and epoch == self.saved_epoch:
            return False  # nothing new since the last save
        if self.every_steps:
            return epoch - (self.saved_epoch or 0) >= self.every_steps or (
                self.saved_epoch is not None and epoch < self.saved_epoch  # rolled back to a quorum's state
            )
        return now - self.saved_at >= self.every_s and epoch > 0

    def busy(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def maybe_save(self, epoch: int, snapshot) -> bool:
        if self.busy() or not self.due(epoch):
            return False
        state = snapshot()
        self.saved_epoch, self.saved_at = state.epoch, time.monotonic()
        self._writer = threading.Thread(target=self._write, args=(state,), name="checkpoint", daemon=True)
        self._writer.start()
        return True

    def save_now(self, state: StageState) -> None:
        """A synchronous save (a peer leaving cleanly); waits for a save in progress first."""
        self.wait()
        self.saved_epoch, self.saved_at = state.epoch, time.monotonic()
        self._write(state)

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._writer is not None:
            self._writer.join(timeout)

    def _write(self, state: StageState) -> None:
        started = time.perf_counter()
        try:
            self.last_digest = save_stage_state(self.path, state)
            self.saves += 1
            self.last_error = None
            logger.info(
                f"checkpoint: stage state of epoch {state.epoch} saved to {self.path} "
                f"({time.perf_counter() - started:.2f}s, digest {self.last_digest[:12]})"
            )
        except Exception as e:  # a full disk must not stop the peer serving; it says so at every try
            self.last_error = f"{type(e).__name__}: {e}"
            logger.warning(f"checkpoint: could not save to {self.path}: {self.last_error}")


def read_header(path: Path) -> Tuple[Dict[str, Any], int]:
    """A checkpoint's ``(meta, epoch)`` from its header alone (no tensors read, no digest checked)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a swarm stage checkpoint")
        return json.loads(metadata.get("meta") or "{}"), int(metadata["epoch"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} has no readable checkpoint header: {e}") from None


def describe_checkpoints(directory: str) -> Dict[str, Any]:
    """What a swarm resuming from ``directory`` (a peer's checkpoint directory, or one holding several peers'
    below it) continues: ``{"model", "num_stages", "step", "files"}``, the step being the newest epoch every stage
    reached (the slowest stage's newest checkpoint). Raises CheckpointError if the checkpoints disagree on the
    model or the cut, or a stage has none."""
    files = sorted(Path(directory).rglob("stage*of*.safetensors"))
    if not files:
        raise CheckpointError(f"no stage checkpoints (stageKofN.safetensors) under {directory}")
    model, num_stages, newest = None, None, {}
    for path in files:
        meta, epoch = read_header(path)
        if model is None:
            model, num_stages = meta.get("model"), meta.get("num_stages")
        elif meta.get("model") != model or meta.get("num_stages") != num_stages:
            raise CheckpointError(f"{path} is of another model or cut than {files[0]}")
        stage = meta.get("stage")
        newest[stage] = max(newest.get(stage, -1), epoch)
    check_model_config(model, str(files[0]))
    if not isinstance(num_stages, int) or sorted(newest) != list(range(num_stages)):
        lacking = [s for s in range(num_stages or 0) if s not in newest]
        raise CheckpointError(f"{directory} has no checkpoint of stage(s) {lacking} of {num_stages}")
    return dict(model=model, num_stages=num_stages, step=min(newest.values()), files=len(files))
