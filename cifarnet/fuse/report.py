"""What :func:`cifarnet.fuse` did: the chains it fused, those it left and why, the modules it
could not trace and the branch checks it kept."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chain:
    """A chain that :func:`fuse` found: conv -> [batch norm ->] ReLU -> max pool, or batch
    norm -> ReLU -> conv.

    Attributes:
        names: one per step, in order: the module's qualified name in the model, or for a
            function called in ``forward`` the ``torch.fx`` node's name (``relu``,
            ``max_pool2d_1``) after the traced module's (``backbone.relu``).
        reason: why it was left unfused, or None if it was fused.
        kind: ``"pool"`` (conv -> [batch norm ->] ReLU -> max pool) or ``"bn_relu_conv"``.
    """

    names: tuple[str, ...]
    reason: str | None = None
    kind: str = "pool"

    def __str__(self) -> str:
        chain = " -> ".join(self.names)
        return chain if self.reason is None else f"{chain}: {self.reason}"


@dataclasses.dataclass
class FusionReport:
    """What :func:`fuse` did to a model.

    Attributes:
        fused: the chains now computed by fused layers, in forward order.
        unfused: the chains left as they were, each with its reason.
        untraced: qualified name (``""``: the model) -> why ``torch.fx`` could not trace the
            module, for the modules fused only by position inside (see :func:`fuse`).
        checks: the branch conditions kept, as run-time checks, in the graphs of traced
            modules: where the condition is and the value the traced branch needs. An input
            that fails one runs the module's own ``forward`` (see :class:`_FusedGraphModule`).
    """

    fused: list[Chain] = dataclasses.field(default_factory=list)
    unfused: list[Chain] = dataclasses.field(default_factory=list)
    untraced: dict[str, str] = dataclasses.field(default_factory=dict)
    checks: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"cifarnet.fuse: fused {len(self.fused)} chain(s), left {len(self.unfused)} unfused"]
        lines += [f"  fused:      {chain}" for chain in self.fused]
        lines += [f"  unfused:    {chain}" for chain in self.unfused]
        lines += [f"  not traced: {name or '(model)'}: {why}" for name, why in self.untraced.items()]
        lines += [f"  check kept: {check}" for check in self.checks]
        return "\n".join(lines)
