"""params.yaml -> typed config objects, with one-line errors for unknown or bad keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .augment import AugConfig
from .data import DataConfig
from .distill import DistillConfig
from .errors import UserError
from .evaluate import EvalConfig
from .experts import ExpertConfig


class ConfigError(UserError, ValueError):
    """A params file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class NetConfig:
    width: int = 128
    depth: int = 3
    norm: str = "instance"


@dataclass(frozen=True)
class ZCAConfig:
    enabled: bool = True
    eps: float = 0.1


@dataclass(frozen=True)
class Paths:
    """Where every artifact lives, relative to the project root."""

    root: Path = Path(".")

    @property
    def train(self) -> Path:
        return self.root / "data" / "train.safetensors"

    @property
    def test(self) -> Path:
        return self.root / "data" / "test.safetensors"

    @property
    def zca(self) -> Path:
        return self.root / "artifacts" / "zca.safetensors"

    @property
    def buffers(self) -> Path:
        return self.root / "artifacts" / "buffers"

    def distilled(self, ipc: int) -> Path:
        return self.root / "artifacts" / "distilled" / f"ipc_{ipc}.safetensors"

    def checkpoint(self, ipc: int) -> Path:
        return self.root / "checkpoints" / f"distill_ipc_{ipc}.safetensors"

    @property
    def fullset(self) -> Path:
        return self.root / "metrics" / "fullset.json"

    def evaluation(self, ipc: int) -> Path:
        return self.root / "metrics" / "evaluate" / f"ipc_{ipc}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def _build(cls: type, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; known: {', '.join(sorted(names))}")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Params:
    """All settings of a profile, parsed from the params.yaml mapping."""

    raw: dict
    data: DataConfig
    zca: ZCAConfig
    net: NetConfig
    augment: AugConfig
    buffers: ExpertConfig
    evaluate: EvalConfig
    device: str = "auto"

    @classmethod
    def from_dict(cls, raw: dict) -> Params:
        known = {"seed", "data", "zca", "net", "augment", "buffers", "distill", "evaluate",
                 "device"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown top-level key '{unknown[0]}'; known: {', '.join(sorted(known))}")
        seed = int(raw.get("seed", 0))
        params = cls(
            raw=raw,
            data=_build(DataConfig, {"seed": seed, **(raw.get("data") or {})}, "data"),
            zca=_build(ZCAConfig, raw.get("zca"), "zca"),
            net=_build(NetConfig, raw.get("net"), "net"),
            augment=_build(AugConfig, raw.get("augment"), "augment"),
            buffers=_build(ExpertConfig, {"seed": seed, **(raw.get("buffers") or {})}, "buffers"),
            evaluate=_build(EvalConfig, {"seed": seed, **(raw.get("evaluate") or {})}, "evaluate"),
            device=str(raw.get("device", "auto")),
        )
        for ipc in params.ipcs:
            params.distill(ipc)  # validate every IPC up front
        return params

    @property
    def ipcs(self) -> list[int]:
        """`distill.ipcs`: the IPCs the pipeline distills (one distill@<ipc> stage each)."""
        section = self.raw.get("distill") or {}
        unknown = sorted(set(section) - {"ipcs", "defaults", "ipc"})
        if unknown:
            raise ConfigError(f"unknown key distill.{unknown[0]}; known: defaults, ipc, ipcs")
        listed = section.get("ipcs") or []
        if not isinstance(listed, list) or not all(isinstance(i, int) for i in listed):
            raise ConfigError("distill.ipcs must be a list of integers, e.g. [1, 10, 50]")
        return sorted(listed)

    def distill(self, ipc: int) -> DistillConfig:
        """The settings of one IPC: distill.defaults overlaid with distill.ipc.<ipc>."""
        if ipc not in self.ipcs:
            listed = ", ".join(map(str, self.ipcs)) or "none"
            raise ConfigError(f"IPC {ipc} is not in params (distill.ipcs lists: {listed})")
        section = self.raw.get("distill") or {}
        table = section.get("ipc") or {}
        own = table.get(ipc) or table.get(str(ipc)) or {}
        if isinstance(own, dict) and "ipc" in own:
            raise ConfigError(f"distill.ipc.{ipc}.ipc: the IPC is the table's key, drop this key")
        merged = {"seed": int(self.raw.get("seed", 0)), **(section.get("defaults") or {}),
                  **own, "ipc": ipc}
        return _build(DistillConfig, merged, f"distill.ipc.{ipc}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return Params.from_dict(_merge(raw, overrides or {}))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out
