"""Drafting policies: when to stop drafting and ask the cloud to verify.

A policy is a plain object with no I/O: the engine asks it how long a draft may
grow and whether to trigger NAV after each drafted token, and tells it how each
round ended. New policies (PipeSD's dual threshold, HSL, EdgeLLM) plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .drafter import DraftToken
from .errors import ConfigError


class Policy(Protocol):
    name: str
    uses_cloud: bool   # False: the draft model's tokens are the output (edge-only)
    uses_draft: bool   # False: the target decodes alone, one token per round (cloud-only)

    def max_draft(self) -> int:
        """Most draft tokens this round (the engine also caps by budget and context)."""

    def should_verify(self, draft: Sequence[DraftToken]) -> bool:
        """Called after each drafted token: stop drafting and verify now?"""

    def on_round(self, drafted: int, accepted: int) -> None:
        """Feedback after each NAV round."""


@dataclass
class EdgeOnly:
    """The draft model alone, on the device: no cloud, unverified output."""

    name: str = "edge_only"
    uses_cloud: bool = False
    uses_draft: bool = True

    def max_draft(self) -> int:
        return 1

    def should_verify(self, draft) -> bool:
        return True

    def on_round(self, drafted: int, accepted: int) -> None:
        pass


@dataclass
class CloudOnly:
    """The target alone: one token per round trip, autoregressively (the reference output)."""

    name: str = "cloud_only"
    uses_cloud: bool = True
    uses_draft: bool = False

    def max_draft(self) -> int:
        return 0

    def should_verify(self, draft) -> bool:
        return True

    def on_round(self, drafted: int, accepted: int) -> None:
        pass


@dataclass
class Vanilla:
    """Fixed draft length k, whole draft sent at once, edge idle while the cloud verifies."""

    k: int = 4
    name: str = "vanilla"
    uses_cloud: bool = True
    uses_draft: bool = True

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"vanilla needs a draft length k >= 1, got {self.k}")

    def max_draft(self) -> int:
        return self.k

    def should_verify(self, draft) -> bool:
        return len(draft) >= self.k

    def on_round(self, drafted: int, accepted: int) -> None:
        pass


MODES = ("cloud_only", "edge_only", "vanilla")


def make_policy(mode: str, k: int = 4) -> Policy:
    if mode == "edge_only":
        return EdgeOnly()
    if mode == "cloud_only":
        return CloudOnly()
    if mode == "vanilla":
        return Vanilla(k)
    raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
